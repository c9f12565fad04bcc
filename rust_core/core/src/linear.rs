//! The hashed linear classifier: calibrated softmax over hashed features.
//!
//! Weights come from a scikit-learn linear model (`coef_`, `intercept_`)
//! trained on [`FeatureHasher`] output, possibly from several hashers whose
//! blocks are concatenated (as `scipy.sparse.hstack` would). Scoring raw texts
//! fuses hashing and the dot product: each hashed feature adds one contiguous
//! row of class weights, so no feature matrix is ever built.
//!
//! Only the rows of features training saw are stored. A hashed space is mostly
//! empty (CLINC150: 12% of 2 x 2^18 features seen), so this keeps a 150-class
//! model in 37 MB instead of 317, and a text's unseen features (typos, numbers,
//! new words) cost no read from memory, where the cold-cache misses of a lone
//! request are most of its scoring time.

use std::sync::Arc;

use rayon::prelude::*;

use crate::hashing::{FeatureHasher, Scratch};
use crate::text::check_classifiable;
use crate::{Error, Result};

/// `row_of` for a feature training never saw: no row is stored for it.
const UNSEEN: u32 = u32::MAX;

/// Batches at least this large are scored on all cores; below it, the cost of
/// waking rayon's workers exceeds the work.
const PARALLEL_BATCH: usize = 256;

#[derive(Debug, Clone)]
pub struct LinearModel {
    hashers: Vec<FeatureHasher>,
    /// Where each hasher's block starts in the concatenated feature space.
    offsets: Vec<usize>,
    n_features: usize,
    /// The class weights of each seen feature, feature-major
    /// (`rows[r * n_outputs + c]`) so one hashed feature reads one cache-friendly
    /// row, rather than 150 strided loads. Shared: a model under another
    /// temperature copies no weights.
    rows: Arc<[f32]>,
    /// Each feature's row in `rows`, or [`UNSEEN`] when its weights are all zeros
    /// (training never saw it). A text none of whose features is known scores the
    /// intercepts alone.
    row_of: Arc<[u32]>,
    bias: Vec<f32>,
    /// 1 for a binary model (one logit, sigmoid), else the number of classes.
    n_outputs: usize,
    labels: Vec<String>,
    temperature: f32,
}

impl LinearModel {
    /// `coef` is row-major `(n_outputs, n_features)` exactly as scikit-learn's
    /// `coef_`; `n_outputs` is 1 for a binary model with two labels.
    pub fn new(
        hashers: Vec<FeatureHasher>,
        coef: &[f32],
        n_outputs: usize,
        intercept: &[f32],
        labels: Vec<String>,
        temperature: f32,
    ) -> Result<Self> {
        if hashers.is_empty() {
            return Err(Error::config(
                "hashers must name at least one FeatureHasher",
            ));
        }
        let mut offsets = Vec::with_capacity(hashers.len());
        let mut n_features = 0usize;
        for h in &hashers {
            offsets.push(n_features);
            n_features += h.n_features();
        }
        if n_outputs == 0 || coef.len() != n_outputs * n_features {
            return Err(Error::config(format!(
                "coef has {} values, expected n_outputs x n_features = {n_outputs} x {n_features} \
                 (the hashers' n_features added up)",
                coef.len()
            )));
        }
        let n_classes = if n_outputs == 1 { 2 } else { n_outputs };
        if labels.len() != n_classes {
            return Err(Error::config(format!(
                "labels has {} entries but coef describes {n_classes} classes",
                labels.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, label) in labels.iter().enumerate() {
            if label.is_empty() {
                return Err(Error::config(format!("labels[{i}] is empty")));
            }
            if !seen.insert(label.as_str()) {
                return Err(Error::config(format!(
                    "labels[{i}] {label:?} is a duplicate"
                )));
            }
        }
        if intercept.len() != n_outputs {
            return Err(Error::config(format!(
                "intercept has {} values, expected {n_outputs}",
                intercept.len()
            )));
        }
        if let Some(i) = coef.iter().position(|w| !w.is_finite()) {
            return Err(Error::config(format!(
                "coef[{}, {}] is not finite ({})",
                i / n_features,
                i % n_features,
                coef[i]
            )));
        }
        if let Some(i) = intercept.iter().position(|w| !w.is_finite()) {
            return Err(Error::config(format!(
                "intercept[{i}] is not finite ({})",
                intercept[i]
            )));
        }
        check_temperature(temperature)?;
        if n_features >= UNSEEN as usize {
            return Err(Error::config(format!(
                "the hashers have {n_features} features together; at most {} are supported",
                UNSEEN - 1
            )));
        }
        let (rows, row_of) = seen_rows(coef, n_outputs, n_features);
        Ok(LinearModel {
            hashers,
            offsets,
            n_features,
            rows: rows.into(),
            row_of: row_of.into(),
            bias: intercept.to_vec(),
            n_outputs,
            labels,
            temperature,
        })
    }

    pub fn hashers(&self) -> &[FeatureHasher] {
        &self.hashers
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn n_classes(&self) -> usize {
        self.labels.len()
    }

    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// How many features training saw: the rows of weights held in memory.
    pub fn seen_features(&self) -> usize {
        self.rows.len() / self.n_outputs
    }

    /// The weight row of feature `f` (an index into the concatenated space), or
    /// None for a feature training never saw.
    #[inline]
    fn row(&self, f: usize) -> Option<&[f32]> {
        let r = self.row_of[f];
        if r == UNSEEN {
            return None;
        }
        let k = self.n_outputs;
        let start = r as usize * k;
        Some(&self.rows[start..start + k])
    }

    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// The same weights under another calibration temperature.
    pub fn with_temperature(&self, temperature: f32) -> Result<Self> {
        check_temperature(temperature)?;
        Ok(LinearModel {
            temperature,
            ..self.clone()
        })
    }

    /// The smallest text limit of the model's hashers.
    pub fn max_text_bytes(&self) -> usize {
        self.hashers
            .iter()
            .map(|h| h.max_text_bytes())
            .min()
            .unwrap_or(0)
    }

    /// Checks the one text of a single-text call (its errors say "the text").
    pub fn check_text(&self, text: &str) -> Result<()> {
        check_classifiable(text, None, self.max_text_bytes())
    }

    fn check_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<()> {
        let limit = self.max_text_bytes();
        for (i, t) in texts.iter().enumerate() {
            check_classifiable(t.as_ref(), Some(i), limit)?;
        }
        Ok(())
    }

    /// Raw scores (before temperature), `n_outputs` per text, into `out`; returns
    /// how many of the text's features the model knows (see `row_of`).
    fn logits_into(&self, text: &str, scratch: &mut Scratch, out: &mut [f32]) -> usize {
        out.copy_from_slice(&self.bias);
        let mut known = 0;
        for (hasher, &offset) in self.hashers.iter().zip(&self.offsets) {
            let features = hasher.row(text, scratch);
            // A text's rows lie scattered over the model: ask for all of them before
            // summing any, so that their cache misses overlap rather than queue.
            for &(index, _) in features.iter() {
                if let Some(row) = self.row(offset + index as usize) {
                    prefetch(row);
                }
            }
            for &(index, value) in features {
                let Some(row) = self.row(offset + index as usize) else {
                    continue; // all zeros: adds nothing
                };
                known += 1;
                let v = value as f32;
                for (o, w) in out.iter_mut().zip(row) {
                    *o += v * w;
                }
            }
        }
        known
    }

    /// Decision-function values (what scikit-learn's `decision_function`
    /// returns): `(n_texts, n_outputs)` row-major.
    pub fn decision_function<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<f32>> {
        self.check_texts(texts)?;
        let k = self.n_outputs;
        let mut out = vec![0.0f32; texts.len() * k];
        self.for_each_row(texts, &mut out, k, |model, text, scratch, row| {
            model.logits_into(text, scratch, row);
        });
        Ok(out)
    }

    /// Calibrated probabilities, `(n_texts, n_classes)` row-major:
    /// `softmax(z / temperature)`, or a sigmoid for a binary model.
    pub fn predict_proba<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<f32>> {
        self.check_texts(texts)?;
        let c = self.n_classes();
        let mut out = vec![0.0f32; texts.len() * c];
        self.for_each_row(texts, &mut out, c, |model, text, scratch, row| {
            model.logits_into(text, scratch, &mut row[..model.n_outputs]);
            model.probabilities_in_place(row);
        });
        Ok(out)
    }

    /// [`Self::predict_proba`], and for each text how many of its features the
    /// model knows: 0 means training saw no part of it, and its probabilities are
    /// the intercepts' alone, the same for every such text.
    pub fn predict_proba_with_support<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        self.check_texts(texts)?;
        let c = self.n_classes();
        let width = c + 1; // the count rides in one more column (exact in f32 below 2^24)
        let mut out = vec![0.0f32; texts.len() * width];
        self.for_each_row(texts, &mut out, width, |model, text, scratch, row| {
            let known = model.logits_into(text, scratch, &mut row[..model.n_outputs]);
            model.probabilities_in_place(&mut row[..c]);
            row[c] = known as f32;
        });
        let mut probs = Vec::with_capacity(texts.len() * c);
        let mut support = Vec::with_capacity(texts.len());
        for row in out.chunks(width) {
            probs.extend_from_slice(&row[..c]);
            support.push(row[c] as u32);
        }
        Ok((probs, support))
    }

    /// Probabilities for rows already hashed into the concatenated feature
    /// space, given as CSR arrays. Indices are bounds-checked.
    pub fn predict_proba_csr(
        &self,
        data: &[f64],
        indices: &[i64],
        indptr: &[i64],
    ) -> Result<Vec<f32>> {
        if indptr.is_empty() {
            return Err(Error::input("indptr must have at least one element"));
        }
        if data.len() != indices.len() {
            return Err(Error::input(format!(
                "data has {} values but indices has {}",
                data.len(),
                indices.len()
            )));
        }
        for (r, w) in indptr.windows(2).enumerate() {
            if w[0] > w[1] || w[0] < 0 || w[1] as usize > data.len() {
                return Err(Error::input(format!(
                    "indptr is not a valid CSR row pointer at row {r} ({} -> {} with {} values)",
                    w[0],
                    w[1],
                    data.len()
                )));
            }
        }
        if let Some(i) = indices
            .iter()
            .position(|&x| x < 0 || x as usize >= self.n_features)
        {
            return Err(Error::input(format!(
                "indices[{i}] = {} is outside the model's {} features",
                indices[i], self.n_features
            )));
        }
        let n_rows = indptr.len() - 1;
        let c = self.n_classes();
        let k = self.n_outputs;
        let mut out = vec![0.0f32; n_rows * c];
        for (r, row) in out.chunks_mut(c).enumerate() {
            let logits = &mut row[..k];
            logits.copy_from_slice(&self.bias);
            for j in indptr[r] as usize..indptr[r + 1] as usize {
                let Some(weights) = self.row(indices[j] as usize) else {
                    continue;
                };
                let v = data[j] as f32;
                for (o, w) in logits.iter_mut().zip(weights) {
                    *o += v * w;
                }
            }
            self.probabilities_in_place(row);
        }
        Ok(out)
    }

    /// Turns the logits at the front of `row` into probabilities over all classes.
    fn probabilities_in_place(&self, row: &mut [f32]) {
        let t = self.temperature;
        if self.n_outputs == 1 {
            let p = 1.0 / (1.0 + (-row[0] / t).exp());
            row[0] = 1.0 - p;
            row[1] = p;
            return;
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z));
        let mut sum = 0.0f32;
        for z in row.iter_mut() {
            *z = ((*z - max) / t).exp();
            sum += *z;
        }
        row.iter_mut().for_each(|p| *p /= sum);
    }

    /// Runs `score` for each text into its `width`-wide row of `out`, in
    /// parallel for large batches, each worker with its own scratch buffers.
    fn for_each_row<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        out: &mut [f32],
        width: usize,
        score: impl Fn(&Self, &str, &mut Scratch, &mut [f32]) + Sync,
    ) {
        if texts.len() >= PARALLEL_BATCH && rayon::current_num_threads() > 1 {
            out.par_chunks_mut(width)
                .zip(texts.par_iter())
                .for_each_init(Scratch::default, |scratch, (row, text)| {
                    score(self, text.as_ref(), scratch, row)
                });
        } else {
            let mut scratch = Scratch::default();
            for (row, text) in out.chunks_mut(width).zip(texts) {
                score(self, text.as_ref(), &mut scratch, row);
            }
        }
    }
}

/// Indices and probabilities of the `k` most probable classes of each row,
/// best first; ties keep the lower class index first.
/// Asks the CPU to bring `row` into its caches (a hint: it never faults, and
/// elsewhere than x86-64 it does nothing).
#[inline]
fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        // SAFETY: a prefetch is only a hint; it reads no memory the program can see
        // and cannot fault, whatever the address (here a live slice's).
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// From scikit-learn's class-major `coef` (`coef[c * n_features + f]`): the
/// feature-major rows of the features with a nonzero weight, and each feature's
/// row (or [`UNSEEN`]).
fn seen_rows(coef: &[f32], n_outputs: usize, n_features: usize) -> (Vec<f32>, Vec<u32>) {
    let mut seen = vec![false; n_features];
    for class in coef.chunks(n_features) {
        for (s, &w) in seen.iter_mut().zip(class) {
            *s |= w != 0.0;
        }
    }
    let mut row_of = vec![UNSEEN; n_features];
    let mut n_rows = 0u32;
    for (r, _) in row_of.iter_mut().zip(&seen).filter(|(_, &s)| s) {
        *r = n_rows;
        n_rows += 1;
    }
    let mut rows = vec![0.0f32; n_rows as usize * n_outputs];
    for (c, class) in coef.chunks(n_features).enumerate() {
        for (&r, &w) in row_of.iter().zip(class) {
            if r != UNSEEN {
                rows[r as usize * n_outputs + c] = w;
            }
        }
    }
    (rows, row_of)
}

pub fn top_k(probs: &[f32], n_classes: usize, k: usize) -> (Vec<i32>, Vec<f32>) {
    let k = k.min(n_classes);
    let rows = probs.len() / n_classes.max(1);
    let mut idx = Vec::with_capacity(rows * k);
    let mut val = Vec::with_capacity(rows * k);
    let mut order: Vec<usize> = Vec::with_capacity(n_classes);
    for row in probs.chunks(n_classes) {
        order.clear();
        order.extend(0..n_classes);
        let cmp = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
        if k < n_classes {
            order.select_nth_unstable_by(k - 1, cmp);
            order.truncate(k);
        }
        order.sort_unstable_by(cmp);
        for &c in order.iter().take(k) {
            idx.push(c as i32);
            val.push(row[c]);
        }
    }
    (idx, val)
}

fn check_temperature(t: f32) -> Result<()> {
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::config(format!(
            "temperature must be a finite number above 0, not {t}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::{Analyzer, HasherConfig};

    fn hasher(n: usize, analyzer: Analyzer) -> FeatureHasher {
        let config = HasherConfig {
            n_features: n,
            analyzer,
            ngram_range: if analyzer == Analyzer::Word {
                (1, 1)
            } else {
                (2, 3)
            },
            ..HasherConfig::default()
        };
        FeatureHasher::new(config, 1 << 16).unwrap()
    }

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn support_counts_the_features_training_saw() {
        let h = hasher(1 << 12, Analyzer::Word);
        let known = h.transform(&["refund"]).unwrap().indices[0] as usize;
        let mut coef = vec![0.0f32; 2 * (1 << 12)];
        coef[known] = 2.0; // class 0 weighs "refund"; every other feature is unseen
        let model = LinearModel::new(vec![h], &coef, 2, &[0.0, 0.5], labels(2), 1.0).unwrap();
        let texts = ["refund please", "zebra quantum", "refund refund"];
        let (probs, support) = model.predict_proba_with_support(&texts).unwrap();
        assert_eq!(support, vec![1, 0, 1]);
        assert_eq!(probs, model.predict_proba(&texts).unwrap());
        // Nothing known: the intercepts alone decide, whatever the text.
        let prior = model.predict_proba(&["quantum zebra"]).unwrap();
        assert_eq!(&probs[2..4], &prior[..]);
        assert!(probs[3] > probs[2]);
    }

    #[test]
    fn fused_scoring_equals_csr_scoring() {
        let hashers = vec![hasher(64, Analyzer::Word), hasher(32, Analyzer::CharWb)];
        let coef: Vec<f32> = (0..3 * 96)
            .map(|i| ((i * 37) % 11) as f32 / 7.0 - 0.7)
            .collect();
        let model =
            LinearModel::new(hashers.clone(), &coef, 3, &[0.1, -0.2, 0.3], labels(3), 1.0).unwrap();
        let texts = ["refund my order", "where is my card", "hello there"];
        let fused = model.predict_proba(&texts).unwrap();
        // Build the concatenated CSR by hand from the two hashers.
        let (mut data, mut indices, mut indptr) = (vec![], vec![], vec![0i64]);
        for t in texts {
            for (h, off) in hashers.iter().zip([0usize, 64]) {
                let csr = h.transform(&[t]).unwrap();
                data.extend(&csr.data);
                indices.extend(csr.indices.iter().map(|&i| i as i64 + off as i64));
            }
            indptr.push(data.len() as i64);
        }
        let via_csr = model.predict_proba_csr(&data, &indices, &indptr).unwrap();
        for (a, b) in fused.iter().zip(&via_csr) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        for row in fused.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn only_seen_rows_are_stored_and_scores_equal_the_dense_product() {
        let hashers = vec![hasher(64, Analyzer::Word), hasher(32, Analyzer::CharWb)];
        let (k, n) = (3, 96);
        // Feature f is seen by some class when f % 3 == 0 (one class each), or by
        // all when f % 5 == 0; -0.0 counts as unseen, as scikit-learn leaves it.
        let mut coef = vec![0.0f32; k * n];
        for f in 0..n {
            if f % 3 == 0 {
                coef[(f % k) * n + f] = f as f32 / 10.0 - 4.0;
            }
            if f % 5 == 0 {
                for c in 0..k {
                    coef[c * n + f] = (c as f32 + 1.0) * 0.3;
                }
            }
        }
        coef[1] = -0.0; // feature 1: otherwise unseen
        let seen = (0..n).filter(|f| f % 3 == 0 || f % 5 == 0).count();
        let bias = [0.1, -0.2, 0.3];
        let model = LinearModel::new(hashers.clone(), &coef, k, &bias, labels(3), 1.0).unwrap();
        assert_eq!(model.seen_features(), seen);
        let texts = ["refund my order 1234", "where is my card", "zz qq"];
        let scores = model.decision_function(&texts).unwrap();
        for (t, got) in texts.iter().zip(scores.chunks(k)) {
            let mut want = bias.to_vec();
            for (h, off) in hashers.iter().zip([0usize, 64]) {
                let csr = h.transform(&[t]).unwrap();
                for (&i, &v) in csr.indices.iter().zip(&csr.data) {
                    for (c, w) in want.iter_mut().enumerate() {
                        *w += v as f32 * coef[c * n + off + i as usize];
                    }
                }
            }
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{t:?}: {got:?} vs {want:?}");
            }
        }
        // The same rows under another temperature: shared, not copied.
        let cooler = model.with_temperature(0.5).unwrap();
        assert!(Arc::ptr_eq(&model.rows, &cooler.rows));
    }

    #[test]
    fn temperature_flattens_and_binary_uses_sigmoid() {
        let h = vec![hasher(16, Analyzer::Word)];
        let coef: Vec<f32> = (0..16).map(|i| i as f32 / 4.0).collect();
        let model = LinearModel::new(h, &coef, 1, &[0.0], labels(2), 1.0).unwrap();
        let sharp = model.predict_proba(&["some words here"]).unwrap();
        let soft = model
            .with_temperature(10.0)
            .unwrap()
            .predict_proba(&["some words here"])
            .unwrap();
        assert!((sharp[0] + sharp[1] - 1.0).abs() < 1e-6);
        assert!((soft[1] - 0.5).abs() < (sharp[1] - 0.5).abs());
    }

    #[test]
    fn invalid_parameters_name_the_parameter() {
        let h = || vec![hasher(4, Analyzer::Word)];
        let err = |r: Result<LinearModel>| r.unwrap_err().to_string();
        assert!(err(LinearModel::new(
            h(),
            &[0.0; 7],
            2,
            &[0.0; 2],
            labels(2),
            1.0
        ))
        .contains("coef"));
        assert!(err(LinearModel::new(
            h(),
            &[0.0; 8],
            2,
            &[0.0; 2],
            labels(3),
            1.0
        ))
        .contains("labels"));
        let mut nan = vec![0.0; 8];
        nan[5] = f32::NAN;
        assert!(
            err(LinearModel::new(h(), &nan, 2, &[0.0; 2], labels(2), 1.0)).contains("coef[1, 1]")
        );
        assert!(err(LinearModel::new(
            h(),
            &[0.0; 8],
            2,
            &[0.0; 2],
            labels(2),
            0.0
        ))
        .contains("temperature"));
        let dup = vec!["a".to_owned(), "a".to_owned()];
        assert!(
            err(LinearModel::new(h(), &[0.0; 8], 2, &[0.0; 2], dup, 1.0)).contains("duplicate")
        );
    }

    #[test]
    fn empty_text_and_bad_csr_are_input_errors() {
        let model = LinearModel::new(
            vec![hasher(4, Analyzer::Word)],
            &[0.0; 8],
            2,
            &[0.0; 2],
            labels(2),
            1.0,
        )
        .unwrap();
        assert!(model
            .predict_proba(&["ok", " "])
            .unwrap_err()
            .to_string()
            .contains("text 1"));
        let e = model.predict_proba_csr(&[1.0], &[4], &[0, 1]).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        let e = model.predict_proba_csr(&[1.0], &[0], &[0, 2]).unwrap_err();
        assert!(e.to_string().contains("indptr"), "{e}");
    }

    #[test]
    fn top_k_orders_best_first_with_stable_ties() {
        let probs = [0.1, 0.4, 0.4, 0.1, 0.7, 0.2, 0.05, 0.05];
        let (idx, val) = top_k(&probs, 4, 2);
        assert_eq!(idx, vec![1, 2, 0, 1]);
        assert_eq!(val, vec![0.4, 0.4, 0.7, 0.2]);
        let (idx, _) = top_k(&probs, 4, 9);
        assert_eq!(idx.len(), 8);
    }
}
