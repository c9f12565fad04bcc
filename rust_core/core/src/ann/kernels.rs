//! Dot-product kernels of the ANN index, chosen once at run time: AVX-512
//! (F, BW and VNNI: Ice Lake, Sapphire Rapids, Zen 4 and later), AVX2 with FMA
//! and F16C, or portable code the compiler vectorises (every other CPU).
//!
//! Every vector the kernels see is zero-padded to a multiple of [`PAD`]
//! elements, so no kernel has a tail loop and the zeros add nothing.
//!
//! Pointers instead of slices: stored vectors live in atomic words (see
//! `store.rs`) that are written once, before the slot is published, and only
//! read afterwards; the kernels read them with plain SIMD loads.

use std::sync::atomic::AtomicI32;

/// Padding unit of every stored or prepared vector, in elements: one 64-byte
/// line of int8, and a whole number of 512-bit registers of f32 and f16.
pub const PAD: usize = 64;

/// The instruction set the kernels use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// `a . b` over `n` f32 (a multiple of [`PAD`]).
    ///
    /// # Safety
    /// `a` and `b` must be readable for `n` f32 with no concurrent writes.
    #[inline]
    pub unsafe fn dot_f32(self, a: *const f32, b: *const f32, n: usize) -> f32 {
        debug_assert_eq!(n % PAD, 0);
        // SAFETY: the caller's contract; the ISA variant was detected on this CPU.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => x86::dot_f32_avx512(a, b, n),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => x86::dot_f32_avx2(a, b, n),
                _ => portable::dot_f32(a, b, n),
            }
        }
    }

    /// `q . decode(code)` for `n` f16 codes (a multiple of [`PAD`]).
    ///
    /// # Safety
    /// `code` readable for `n` u16 and `q` for `n` f32, with no concurrent writes.
    #[inline]
    pub unsafe fn dot_f16(self, code: *const u16, q: *const f32, n: usize) -> f32 {
        debug_assert_eq!(n % PAD, 0);
        // SAFETY: as for `dot_f32`.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => x86::dot_f16_avx512(code, q, n),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => x86::dot_f16_avx2(code, q, n),
                _ => portable::dot_f16(code, q, n),
            }
        }
    }

    /// `q . code` for `n` int8 codes (a multiple of [`PAD`]), unscaled.
    ///
    /// # Safety
    /// `code` readable for `n` bytes and `q` for `n` f32, with no concurrent writes.
    #[inline]
    pub unsafe fn dot_i8(self, code: *const i8, q: *const f32, n: usize) -> f32 {
        debug_assert_eq!(n % PAD, 0);
        // SAFETY: as for `dot_f32`.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => x86::dot_i8_avx512(code, q, n),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => x86::dot_i8_avx2(code, q, n),
                _ => portable::dot_i8(code, q, n),
            }
        }
    }

    /// Exact integer dot products `q . row` of an int8 query with `rows` int8
    /// rows `stride` bytes apart, each of `n` codes (a multiple of [`PAD`]).
    /// `sums[r]` is the sum of row `r`'s codes (the AVX-512 path multiplies
    /// unsigned bytes, `q + 128`, and subtracts `128 * sum`).
    ///
    /// # Safety
    /// `rows` must be readable for `rows_n * stride` bytes with no concurrent
    /// writes; `stride >= n`.
    pub unsafe fn scan_i8(
        self,
        q: &[i8],
        rows: *const i8,
        stride: usize,
        sums: &[AtomicI32],
        out: &mut [i32],
    ) {
        debug_assert_eq!(q.len() % PAD, 0);
        debug_assert!(stride >= q.len() && sums.len() == out.len());
        // SAFETY: as above.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => x86::scan_i8_avx512(q, rows, stride, sums, out),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => x86::scan_i8_avx2(q, rows, stride, out),
                _ => portable::scan_i8(q, rows, stride, sums, out),
            }
        }
    }
}

/// Asks for the `lines` 64-byte lines at `p` to be brought into L1.
#[inline(always)]
pub fn prefetch(p: *const u8, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in 0..lines {
        // SAFETY: prefetching is a hint; it never faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.wrapping_add(64 * i) as *const i8,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, lines);
}

/// f32 to IEEE half precision, rounding to nearest even (F16C does the same).
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    let round = |kept: u32, rest: u32, half: u32| -> u32 {
        if rest > half || (rest == half && kept & 1 == 1) {
            kept + 1
        } else {
            kept
        }
    };
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let kept = m >> shift;
        return sign | round(kept, m & ((1 << shift) - 1), 1 << (shift - 1)) as u16;
    }
    // A carry out of the mantissa correctly bumps the exponent.
    sign | round(((e as u32) << 10) | (man >> 13), man & 0x1fff, 0x1000) as u16
}

/// IEEE half precision to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    match exp {
        0 => sign * man as f32 * f32::powi(2.0, -24),
        31 if man == 0 => sign * f32::INFINITY,
        31 => f32::NAN,
        _ => f32::from_bits((u32::from(h & 0x8000) << 16) | ((exp + 112) << 23) | (man << 13)),
    }
}

mod portable {
    use std::sync::atomic::AtomicI32;
    /// Sixteen independent partial sums so the compiler can keep them in SIMD
    /// lanes (one running sum forces strict left-to-right order).
    macro_rules! lanes_dot {
        ($n:expr, |$i:ident| $term:expr) => {{
            let mut acc = [0.0f32; 16];
            let mut base = 0;
            while base < $n {
                for (l, a) in acc.iter_mut().enumerate() {
                    let $i = base + l;
                    *a += $term;
                }
                base += 16;
            }
            acc.iter().sum::<f32>()
        }};
    }

    pub unsafe fn dot_f32(a: *const f32, b: *const f32, n: usize) -> f32 {
        // SAFETY: the caller guarantees `n` readable elements in both.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a, n),
                std::slice::from_raw_parts(b, n),
            )
        };
        lanes_dot!(n, |i| a[i] * b[i])
    }

    pub unsafe fn dot_f16(code: *const u16, q: *const f32, n: usize) -> f32 {
        // SAFETY: as above.
        let (c, q) = unsafe {
            (
                std::slice::from_raw_parts(code, n),
                std::slice::from_raw_parts(q, n),
            )
        };
        lanes_dot!(n, |i| super::f16_to_f32(c[i]) * q[i])
    }

    pub unsafe fn dot_i8(code: *const i8, q: *const f32, n: usize) -> f32 {
        // SAFETY: as above.
        let (c, q) = unsafe {
            (
                std::slice::from_raw_parts(code, n),
                std::slice::from_raw_parts(q, n),
            )
        };
        lanes_dot!(n, |i| f32::from(c[i]) * q[i])
    }

    /// Multiplies signed bytes directly, so the row sums are not needed.
    pub unsafe fn scan_i8(
        q: &[i8],
        rows: *const i8,
        stride: usize,
        _sums: &[AtomicI32],
        out: &mut [i32],
    ) {
        for (r, o) in out.iter_mut().enumerate() {
            // SAFETY: the caller guarantees `out.len()` rows of `stride >= q.len()` bytes.
            let row = unsafe { std::slice::from_raw_parts(rows.add(r * stride), q.len()) };
            *o = row
                .iter()
                .zip(q)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::sync::atomic::{AtomicI32, Ordering};

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f32_avx512(a: *const f32, b: *const f32, n: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 16 f32 below `n` (a multiple of 64).
        unsafe {
            while i < n {
                for (j, s) in acc.iter_mut().enumerate() {
                    let at = i + 16 * j;
                    *s =
                        _mm512_fmadd_ps(_mm512_loadu_ps(a.add(at)), _mm512_loadu_ps(b.add(at)), *s);
                }
                i += 64;
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f16_avx512(code: *const u16, q: *const f32, n: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 16 halves / 16 f32 below `n`.
        unsafe {
            while i < n {
                for (j, s) in acc.iter_mut().enumerate() {
                    let at = i + 16 * j;
                    let h = _mm512_cvtph_ps(_mm256_loadu_si256(code.add(at) as *const __m256i));
                    *s = _mm512_fmadd_ps(h, _mm512_loadu_ps(q.add(at)), *s);
                }
                i += 64;
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_i8_avx512(code: *const i8, q: *const f32, n: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 16 bytes / 16 f32 below `n`.
        unsafe {
            while i < n {
                for (j, s) in acc.iter_mut().enumerate() {
                    let at = i + 16 * j;
                    let c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        code.add(at) as *const __m128i
                    )));
                    *s = _mm512_fmadd_ps(c, _mm512_loadu_ps(q.add(at)), *s);
                }
                i += 64;
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn scan_i8_avx512(
        q: &[i8],
        rows: *const i8,
        stride: usize,
        sums: &[AtomicI32],
        out: &mut [i32],
    ) {
        // vpdpbusd multiplies unsigned by signed bytes: shift the query by 128
        // and take 128 * (sum of the row) back off, exactly.
        let n = q.len();
        let shifted: Vec<u8> = q.iter().map(|&x| (i16::from(x) + 128) as u8).collect();
        let qs = shifted.as_ptr();
        for (r, (o, sum)) in out.iter_mut().zip(sums).enumerate() {
            let mut acc = [_mm512_setzero_si512(); 2];
            let mut i = 0;
            // SAFETY: row `r` has `stride >= n` readable bytes; loads stay below `n`.
            unsafe {
                let row = rows.add(r * stride);
                while i + 128 <= n {
                    for (j, a) in acc.iter_mut().enumerate() {
                        let at = i + 64 * j;
                        *a = _mm512_dpbusd_epi32(
                            *a,
                            _mm512_loadu_si512(qs.add(at) as *const _),
                            _mm512_loadu_si512(row.add(at) as *const _),
                        );
                    }
                    i += 128;
                }
                if i < n {
                    acc[0] = _mm512_dpbusd_epi32(
                        acc[0],
                        _mm512_loadu_si512(qs.add(i) as *const _),
                        _mm512_loadu_si512(row.add(i) as *const _),
                    );
                }
            }
            *o = _mm512_reduce_add_epi32(_mm512_add_epi32(acc[0], acc[1]))
                - 128 * sum.load(Ordering::Relaxed);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_avx2(a: *const f32, b: *const f32, n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 8 f32 below `n`.
        unsafe {
            while i < n {
                for (j, s) in acc.iter_mut().enumerate() {
                    let at = i + 8 * j;
                    *s =
                        _mm256_fmadd_ps(_mm256_loadu_ps(a.add(at)), _mm256_loadu_ps(b.add(at)), *s);
                }
                i += 32;
            }
            hsum256(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16_avx2(code: *const u16, q: *const f32, n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 8 halves / 8 f32 below `n`.
        unsafe {
            while i < n {
                for (j, s) in acc.iter_mut().enumerate() {
                    let at = i + 8 * j;
                    let h = _mm256_cvtph_ps(_mm_loadu_si128(code.add(at) as *const __m128i));
                    *s = _mm256_fmadd_ps(h, _mm256_loadu_ps(q.add(at)), *s);
                }
                i += 32;
            }
            hsum256(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_i8_avx2(code: *const i8, q: *const f32, n: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 8 bytes / 8 f32 below `n`.
        unsafe {
            while i < n {
                for (j, s) in acc.iter_mut().enumerate() {
                    let at = i + 8 * j;
                    let c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        code.add(at) as *const __m128i
                    )));
                    *s = _mm256_fmadd_ps(c, _mm256_loadu_ps(q.add(at)), *s);
                }
                i += 32;
            }
            hsum256(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ))
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn scan_i8_avx2(q: &[i8], rows: *const i8, stride: usize, out: &mut [i32]) {
        let n = q.len();
        for (r, o) in out.iter_mut().enumerate() {
            let mut acc = _mm256_setzero_si256();
            let mut i = 0;
            // SAFETY: row `r` has `stride >= n` readable bytes; loads stay below `n`.
            unsafe {
                let row = rows.add(r * stride);
                while i < n {
                    let a = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.as_ptr().add(i) as *const _));
                    let b = _mm256_cvtepi8_epi16(_mm_loadu_si128(row.add(i) as *const _));
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
                    i += 16;
                }
            }
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(acc),
                _mm256_extracti128_si256::<1>(acc),
            );
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            *o = _mm_cvtsi128_si32(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        let best = Isa::detect();
        if best == Isa::Avx512 {
            v.push(Isa::Avx2);
        }
        if best != Isa::Portable {
            v.push(best);
        }
        v
    }

    #[test]
    fn every_isa_agrees_with_a_scalar_sum() {
        for n in [64, 128, 384, 448] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let q: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let h: Vec<u16> = a.iter().map(|&x| f32_to_f16(x)).collect();
            let c: Vec<i8> = a.iter().map(|&x| (x * 127.0).round() as i8).collect();
            let qi: Vec<i8> = q.iter().map(|&x| (x * 127.0).round() as i8).collect();
            let exact: f64 = a.iter().zip(&q).map(|(x, y)| *x as f64 * *y as f64).sum();
            let via_h: f64 = h
                .iter()
                .zip(&q)
                .map(|(x, y)| f16_to_f32(*x) as f64 * *y as f64)
                .sum();
            let via_c: f64 = c.iter().zip(&q).map(|(x, y)| *x as f64 * *y as f64).sum();
            let ints: i32 = c
                .iter()
                .zip(&qi)
                .map(|(x, y)| i32::from(*x) * i32::from(*y))
                .sum();
            let sum: i32 = c.iter().map(|&x| i32::from(x)).sum();
            for isa in isas() {
                // SAFETY: every buffer holds `n` elements.
                unsafe {
                    assert!((isa.dot_f32(a.as_ptr(), q.as_ptr(), n) as f64 - exact).abs() < 1e-3);
                    assert!((isa.dot_f16(h.as_ptr(), q.as_ptr(), n) as f64 - via_h).abs() < 1e-3);
                    assert!((isa.dot_i8(c.as_ptr(), q.as_ptr(), n) as f64 - via_c).abs() < 1e-2);
                    let mut out = [0i32; 2];
                    let rows: Vec<i8> = c.iter().chain(&c).copied().collect();
                    let sums = [AtomicI32::new(sum), AtomicI32::new(sum)];
                    isa.scan_i8(&qi, rows.as_ptr(), n, &sums, &mut out);
                    assert_eq!(out, [ints, ints], "{isa:?} n={n}");
                }
            }
        }
    }

    #[test]
    fn half_conversion_matches_known_values_and_round_trips() {
        for (x, h) in [
            (0.0f32, 0u16),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (65504.0, 0x7bff),
            (1e6, 0x7c00),
            (5.960_464_5e-8, 0x0001),
            (6.103_515_6e-5, 0x0400),
        ] {
            assert_eq!(f32_to_f16(x), h, "{x}");
            let back = if x > 65504.0 { f32::INFINITY } else { x };
            assert_eq!(f16_to_f32(h), back, "{h:#x}");
        }
        for h in 0..0x7c00u16 {
            assert_eq!(f32_to_f16(f16_to_f32(h)), h);
        }
        // Rounding to nearest even, as F16C does.
        assert_eq!(f32_to_f16(1.0 + f32::powi(2.0, -11)), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * f32::powi(2.0, -11)), 0x3c02);
    }
}
