//! Exact search for small indexes: a contiguous copy of the vectors scanned
//! with an f32 SIMD dot product.
//!
//! The graph engine's own exact search goes through per-slot indirection and
//! measured about three times slower than a plain matrix-vector product, and
//! numkong's f32 dot accumulates in f64 (precision first), which measured
//! 2.4x slower than numpy here; the kernel below is the usual eight-lane FMA
//! loop, chosen at run time, with a portable fallback the compiler vectorises.

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct FlatStore {
    dim: usize,
    vectors: Vec<f32>,
    ids: Vec<u64>,
    slots: HashMap<u64, usize>,
}

impl FlatStore {
    pub fn new(dim: usize) -> Self {
        FlatStore {
            dim,
            ..FlatStore::default()
        }
    }

    /// Adds a vector already prepared for the metric (normalised for cosine).
    pub fn push(&mut self, id: u64, vector: &[f32]) {
        self.slots.insert(id, self.ids.len());
        self.ids.push(id);
        self.vectors.extend_from_slice(vector);
    }

    pub fn remove(&mut self, id: u64) {
        let Some(slot) = self.slots.remove(&id) else {
            return;
        };
        let last = self.ids.len() - 1;
        if slot != last {
            let moved = self.ids[last];
            self.ids[slot] = moved;
            self.slots.insert(moved, slot);
            let (head, tail) = self.vectors.split_at_mut(last * self.dim);
            head[slot * self.dim..(slot + 1) * self.dim].copy_from_slice(&tail[..self.dim]);
        }
        self.ids.pop();
        self.vectors.truncate(last * self.dim);
    }

    /// The `k` highest dot products with `query` (prepared like the stored
    /// vectors), best first, into `ids` / `scores` (which have `k` slots).
    pub fn search(&self, query: &[f32], k: usize, ids: &mut [i64], scores: &mut [f32]) {
        let mut all = vec![0.0f32; self.ids.len()];
        scores_into(&self.vectors, query, &mut all);
        // One pass with a small sorted buffer: after the first few rows almost
        // every score falls below the k-th best and costs one comparison.
        let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
        for (row, &s) in all.iter().enumerate() {
            if best.len() == k && s <= best[k - 1].0 {
                continue;
            }
            let at = best.partition_point(|b| b.0 >= s);
            best.insert(at, (s, row));
            best.truncate(k);
        }
        for (j, (s, row)) in best.into_iter().enumerate() {
            ids[j] = self.ids[row] as i64;
            scores[j] = s;
        }
    }
}

/// `out[r] = rows[r] . query` for every row of the row-major `rows`.
pub fn scores_into(rows: &[f32], query: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { scores_avx2(rows, query, out) };
            return;
        }
    }
    for (row, o) in rows.chunks_exact(query.len()).zip(out.iter_mut()) {
        *o = dot_portable(row, query);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(rows: &[f32], query: &[f32], out: &mut [f32]) {
    // One row at a time is already at one core's memory bandwidth here
    // (blocking four rows per pass measured no faster).
    for (row, o) in rows.chunks_exact(query.len()).zip(out.iter_mut()) {
        // SAFETY: called only where the features are present (see above).
        *o = unsafe { dot_avx2(row, query) };
    }
}

/// Eight independent partial sums so the compiler can keep them in SIMD
/// lanes (a single running sum forces strict left-to-right order).
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // Four accumulators: one FMA chain would wait on its own latency.
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads 8 floats below `n`, inside both slices.
    unsafe {
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let at = i + 8 * j;
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(at)), _mm256_loadu_ps(pb.add(at)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` has room for 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    let tail: f32 = a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_kernels_agree_with_a_scalar_sum() {
        for n in [0, 1, 7, 8, 15, 16, 17, 384, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            if n > 0 {
                let mut via_kernel = [0.0f32];
                scores_into(&a, &b, &mut via_kernel);
                assert!((via_kernel[0] as f64 - exact).abs() < 1e-3, "n={n}");
            }
            assert!((dot_portable(&a, &b) as f64 - exact).abs() < 1e-3, "n={n}");
        }
    }

    #[test]
    fn batch_scores_match_per_row_dots() {
        for (rows, dim) in [(1, 8), (5, 16), (9, 384), (7, 12)] {
            let data: Vec<f32> = (0..rows * dim).map(|i| (i as f32 * 0.013).sin()).collect();
            let q: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.7).cos()).collect();
            let mut out = vec![0.0f32; rows];
            scores_into(&data, &q, &mut out);
            for (r, o) in out.iter().enumerate() {
                let want = dot_portable(&data[r * dim..(r + 1) * dim], &q);
                assert!(
                    (o - want).abs() < 1e-4,
                    "rows={rows} dim={dim} r={r}: {o} vs {want}"
                );
            }
        }
    }

    #[test]
    fn top_k_after_removals() {
        let mut f = FlatStore::new(2);
        f.push(1, &[1.0, 0.0]);
        f.push(2, &[0.0, 1.0]);
        f.push(3, &[0.6, 0.8]);
        f.remove(1);
        let (mut ids, mut scores) = (vec![-1; 3], vec![f32::NEG_INFINITY; 3]);
        f.search(&[1.0, 0.0], 3, &mut ids, &mut scores);
        assert_eq!(ids, vec![3, 2, -1]);
        assert!((scores[0] - 0.6).abs() < 1e-6);
        assert_eq!(f.ids.len(), 2);
    }
}
