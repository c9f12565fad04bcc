//! Per-slot storage of the ANN index: ids, states, the f32 vectors (for
//! re-ranking, `get` and `save`) and the compact codes the graph is walked with.
//!
//! Memory model, the one invariant the `unsafe` reads rely on: a slot's data
//! (vector, codes, scale, id) is written once, with atomic stores, by the
//! writer that was handed the slot, and never again (the graph's links, which
//! share the codes' block, change later but are only ever accessed as
//! atomics, and the kernels never read them); the writer then publishes
//! every slot below some bound with one Release store to `published`. The
//! kernels read a slot's words with plain SIMD loads only after an Acquire load
//! of `published` has shown the slot below it, so every such read happens after
//! the slot's last write. Growing the arrays takes `&mut self` (the index's
//! write lock), so no reader holds a pointer into them while they move.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use super::kernels::{f16_to_f32, f32_to_f16, prefetch, Isa, PAD};

/// One 64-byte cache line of atomic words.
#[repr(C, align(64))]
#[derive(Default)]
pub struct Line([AtomicU32; 16]);

// Lines are contiguous words with no padding (`Lines::words` relies on it).
const _: () = assert!(std::mem::size_of::<Line>() == 64);

/// One fixed-size record of whole 64-byte lines per slot.
pub struct Lines {
    lines: Vec<Line>,
    stride: usize,
}

impl Lines {
    pub fn new(bytes_per_slot: usize) -> Self {
        Lines {
            lines: Vec::new(),
            stride: bytes_per_slot.div_ceil(64),
        }
    }

    pub fn grow(&mut self, slots: usize) {
        self.lines.resize_with(slots * self.stride, Line::default);
    }

    pub fn stride_bytes(&self) -> usize {
        self.stride * 64
    }

    /// The words of `slot`'s record.
    pub fn words(&self, slot: usize) -> &[AtomicU32] {
        let lines = &self.lines[slot * self.stride..(slot + 1) * self.stride];
        // SAFETY: `Line` is `repr(C)` around `[AtomicU32; 16]` with no padding
        // (asserted above), so the lines are `16 * stride` contiguous words.
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 16) }
    }

    /// Stores `words` into `slot`'s record from word `at` on.
    pub fn write(&self, slot: usize, at: usize, words: impl IntoIterator<Item = u32>) {
        for (cell, v) in self.words(slot)[at..].iter().zip(words) {
            cell.store(v, Ordering::Relaxed);
        }
    }

    pub fn word(&self, slot: usize, w: usize) -> u32 {
        self.lines[slot * self.stride + w / 16].0[w % 16].load(Ordering::Relaxed)
    }

    /// The first byte of `slot`'s record (and of every later one: the
    /// pointer may be used to read `slots - slot` whole records).
    pub fn ptr(&self, slot: usize) -> *const u8 {
        self.lines[slot * self.stride..].as_ptr().cast()
    }
}

/// How the graph's copy of a vector is encoded. f32 indexes walk over f16:
/// int8 codes measured only ~5% faster on the benchmark data at the same
/// recall, with errors some 16 times larger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// IEEE half precision: half the bytes of f32, relative error 2^-11.
    F16,
    /// int8 with one scale per vector (`max |x| / 127`).
    I8,
}

/// Slot states; a slot is 0 (not yet live) until its batch is linked.
pub const LIVE: u8 = 1;
pub const DELETED: u8 = 2;

/// int8 codes of `v` and their scale: `v[i] ~ scale * codes[i]`.
pub fn quantise_i8(v: &[f32]) -> (f32, Vec<i8>) {
    let amax = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
    let codes = v
        .iter()
        .map(|&x| (x / scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (scale, codes)
}

fn pack_i8(codes: &[i8]) -> impl Iterator<Item = u32> + '_ {
    codes.chunks(4).map(|c| {
        let mut b = [0u8; 4];
        for (d, &s) in b.iter_mut().zip(c) {
            *d = s as u8;
        }
        u32::from_le_bytes(b)
    })
}

pub struct Store {
    pub dim: usize,
    /// `dim` rounded up to [`PAD`]: the length of every prepared query.
    pub padded: usize,
    pub isa: Isa,
    codec: Codec,
    /// f32 copies, unless the index stores int8 only.
    exact: Option<Lines>,
    /// Per slot: the graph's layer-0 list (`links` words, padded to whole
    /// lines), then the codes.
    codes: Lines,
    links: usize,
    /// Word offset of the codes in a `codes` record.
    code_at: usize,
    scales: Vec<AtomicU32>,
    ids: Vec<AtomicU64>,
    states: Vec<AtomicU8>,
    /// Slots handed out; changed only by the (single) writer.
    used: AtomicUsize,
    published: AtomicUsize,
    live: AtomicUsize,
    /// Largest norm of a stored vector, and largest distance between a
    /// vector and its codes (f32 bits; non-negative floats order like their bits).
    max_norm: AtomicU32,
    max_code_error: AtomicU32,
}

impl Store {
    /// `links` words per slot are kept for the graph's layer-0 list.
    pub fn new(dim: usize, codec: Codec, keep_f32: bool, links: usize) -> Self {
        let padded = dim.div_ceil(PAD) * PAD;
        let code_bytes = match codec {
            Codec::F16 => padded * 2,
            Codec::I8 => padded,
        };
        let code_at = links.div_ceil(16) * 16;
        Store {
            dim,
            padded,
            isa: Isa::detect(),
            codec,
            exact: keep_f32.then(|| Lines::new(padded * 4)),
            codes: Lines::new(code_at * 4 + code_bytes),
            links,
            code_at,
            scales: Vec::new(),
            ids: Vec::new(),
            states: Vec::new(),
            used: AtomicUsize::new(0),
            published: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            max_norm: AtomicU32::new(0),
            max_code_error: AtomicU32::new(0),
        }
    }

    pub fn keeps_f32(&self) -> bool {
        self.exact.is_some()
    }

    pub fn capacity(&self) -> usize {
        self.ids.len()
    }

    pub fn grow(&mut self, slots: usize) {
        if let Some(e) = self.exact.as_mut() {
            e.grow(slots);
        }
        self.codes.grow(slots);
        self.scales.resize_with(slots, Default::default);
        self.ids.resize_with(slots, Default::default);
        self.states.resize_with(slots, Default::default);
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Slots whose data may be read.
    pub fn published(&self) -> usize {
        self.published.load(Ordering::Acquire)
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Hands out `n` slots to the writer (who must hold the index's writer lock).
    pub fn take_slots(&self, n: usize) -> usize {
        let base = self.used();
        assert!(base + n <= self.capacity(), "slots reserved before use");
        self.used.store(base + n, Ordering::Relaxed);
        base
    }

    /// Writes `slot` (handed out, not yet published): `v` has `dim` values,
    /// already prepared for the metric.
    pub fn write(&self, slot: usize, id: u64, v: &[f32]) {
        assert!(slot >= self.published() && slot < self.used());
        self.ids[slot].store(id, Ordering::Relaxed);
        let padded = || {
            v.iter()
                .copied()
                .chain(std::iter::repeat(0.0))
                .take(self.padded)
        };
        if let Some(e) = &self.exact {
            e.write(slot, 0, padded().map(f32::to_bits));
        }
        match self.codec {
            Codec::F16 => {
                let halves: Vec<u16> = padded().map(f32_to_f16).collect();
                self.codes.write(
                    slot,
                    self.code_at,
                    halves
                        .chunks(2)
                        .map(|h| u32::from(h[0]) | (u32::from(h[1]) << 16)),
                );
                self.scales[slot].store(1.0f32.to_bits(), Ordering::Relaxed);
            }
            Codec::I8 => {
                let (scale, codes) = quantise_i8(v);
                self.codes.write(slot, self.code_at, pack_i8(&codes));
                self.scales[slot].store(scale.to_bits(), Ordering::Relaxed);
            }
        }
        let (mut norm, mut error) = (0.0f64, 0.0f64);
        for (&x, y) in v.iter().zip(self.decode(slot)) {
            norm += f64::from(x).powi(2);
            error += (f64::from(x) - f64::from(y)).powi(2);
        }
        let up = |x: f64| ((x.sqrt() * (1.0 + 1e-6)) as f32).to_bits();
        self.max_norm.fetch_max(up(norm), Ordering::Relaxed);
        self.max_code_error.fetch_max(up(error), Ordering::Relaxed);
    }

    /// The codes of `slot`, decoded.
    fn decode(&self, slot: usize) -> impl Iterator<Item = f32> + '_ {
        let scale = self.scale(slot);
        (0..self.padded).map(move |i| match self.codec {
            Codec::F16 => {
                let word = self.codes.word(slot, self.code_at + i / 2);
                f16_to_f32((word >> (16 * (i % 2))) as u16)
            }
            Codec::I8 => {
                let word = self.codes.word(slot, self.code_at + i / 4);
                f32::from((word >> (8 * (i % 4))) as u8 as i8) * scale
            }
        })
    }

    /// A bound of `|sim(q, v) - exact_sim(q, v)|` for any stored `v`, given
    /// `|q|`: the codes' error, and the f32 rounding of both dot products.
    pub fn sim_error(&self, q_norm: f32) -> f32 {
        let norm = f32::from_bits(self.max_norm.load(Ordering::Relaxed));
        let code = f32::from_bits(self.max_code_error.load(Ordering::Relaxed));
        let rounding = 2.0 * super::flat::slack(self.padded) as f32 * (norm + code);
        q_norm * (code + rounding) * 1.01
    }

    /// Makes every slot below `upto` readable (a Release store: see the module doc).
    pub fn publish(&self, upto: usize) {
        assert!(upto <= self.used());
        self.published.store(upto, Ordering::Release);
    }

    pub fn set_state(&self, slot: usize, state: u8) {
        let old = self.states[slot].swap(state, Ordering::Release);
        match (old == LIVE, state == LIVE) {
            (false, true) => self.live.fetch_add(1, Ordering::Relaxed),
            (true, false) => self.live.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    pub fn state(&self, slot: usize) -> u8 {
        self.states[slot].load(Ordering::Acquire)
    }

    pub fn is_live(&self, slot: usize) -> bool {
        self.state(slot) == LIVE
    }

    pub fn id(&self, slot: usize) -> u64 {
        self.ids[slot].load(Ordering::Relaxed)
    }

    pub fn scale(&self, slot: usize) -> f32 {
        f32::from_bits(self.scales[slot].load(Ordering::Relaxed))
    }

    fn check_published(&self, slot: usize) {
        assert!(
            slot < self.published(),
            "slot {slot} read before it was published"
        );
    }

    /// Approximate similarity of the prepared query `q` to `slot`, from its codes.
    #[inline]
    pub fn sim(&self, q: &[f32], slot: usize) -> f32 {
        // The kernels read `padded` values through the pointer: a short query
        // would be an out-of-bounds read, so this safe entry point checks.
        assert_eq!(
            q.len(),
            self.padded,
            "query is not padded to the record length"
        );
        self.sim_ptr(q.as_ptr(), slot)
    }

    #[inline]
    fn sim_ptr(&self, q: *const f32, slot: usize) -> f32 {
        self.check_published(slot);
        let code = self.code_ptr(slot);
        // SAFETY: the slot is published (checked above) and its record holds
        // `padded` codes; `q` points at `padded` f32 (callers pass prepared
        // queries or a published f32 record).
        unsafe {
            match self.codec {
                Codec::F16 => self.isa.dot_f16(code.cast(), q, self.padded),
                Codec::I8 => self.isa.dot_i8(code.cast(), q, self.padded) * self.scale(slot),
            }
        }
    }

    /// Similarity of `a` (exact where kept) to `b` (codes): the graph's
    /// measure between two stored vectors. `buf` holds a decoded `a` if needed.
    pub fn sim_between(&self, a: usize, b: usize, buf: &mut Vec<f32>) -> f32 {
        match &self.exact {
            Some(e) => {
                self.check_published(a);
                self.sim_ptr(e.ptr(a).cast(), b)
            }
            None => {
                self.vector_into(a, buf);
                self.sim(buf, b)
            }
        }
    }

    /// Similarity of `q` to `slot` at full precision: the f32 copy where kept.
    pub fn exact_sim(&self, q: &[f32], slot: usize) -> f32 {
        match &self.exact {
            Some(e) => {
                self.check_published(slot);
                assert_eq!(q.len(), self.padded);
                // SAFETY: published (checked), `padded` f32 in the record and in `q`.
                unsafe {
                    self.isa
                        .dot_f32(e.ptr(slot).cast(), q.as_ptr(), self.padded)
                }
            }
            None => self.sim(q, slot),
        }
    }

    /// Hints that `slot`'s block (links, then codes) will be read soon.
    #[inline]
    pub fn prefetch(&self, slot: usize, lines: usize) {
        prefetch(self.codes.ptr(slot), lines.min(self.codes.stride));
    }

    /// Hints that `slot`'s f32 copy will be read soon.
    #[inline]
    pub fn prefetch_exact(&self, slot: usize) {
        if let Some(e) = &self.exact {
            prefetch(e.ptr(slot), e.stride);
        }
    }

    /// Lines in a slot's block (links and codes).
    pub fn block_lines(&self) -> usize {
        self.codes.stride
    }

    /// The stored vector of `slot` (f32 copy, or decoded codes), `padded` long.
    pub fn vector_into(&self, slot: usize, out: &mut Vec<f32>) {
        out.clear();
        match (&self.exact, self.codec) {
            (Some(e), _) => out.extend((0..self.padded).map(|w| f32::from_bits(e.word(slot, w)))),
            (None, _) => out.extend(self.decode(slot)),
        }
    }

    /// `v` as this store will give it back: itself, or its int8 approximation.
    pub fn stored_form<'a>(&self, v: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        if self.exact.is_some() {
            return v.into();
        }
        let (scale, codes) = quantise_i8(v);
        codes
            .iter()
            .map(|&c| f32::from(c) * scale)
            .collect::<Vec<_>>()
            .into()
    }

    /// int8 codes and scale of `slot` (int8 codec only), for saving.
    pub fn codes_i8(&self, slot: usize) -> (f32, Vec<i8>) {
        let mut codes = Vec::with_capacity(self.padded);
        for w in 0..self.padded / 4 {
            codes.extend(
                self.codes
                    .word(slot, self.code_at + w)
                    .to_le_bytes()
                    .map(|b| b as i8),
            );
        }
        codes.truncate(self.dim);
        (self.scale(slot), codes)
    }

    /// Writes int8 codes as they were saved (int8 storage only).
    pub fn write_i8(&self, slot: usize, id: u64, scale: f32, codes: &[i8]) {
        assert!(self.codec == Codec::I8 && self.exact.is_none());
        assert!(slot >= self.published() && slot < self.used());
        self.ids[slot].store(id, Ordering::Relaxed);
        self.codes.write(slot, self.code_at, pack_i8(codes));
        self.scales[slot].store(scale.to_bits(), Ordering::Relaxed);
    }

    /// The graph's layer-0 list of `slot` (atomics: see `hnsw.rs`).
    #[inline]
    pub fn links0(&self, slot: usize) -> &[AtomicU32] {
        &self.codes.words(slot)[..self.links]
    }

    fn code_ptr(&self, slot: usize) -> *const u8 {
        self.codes.ptr(slot).wrapping_add(self.code_at * 4)
    }
}

/// Per-slot int8 copy for exact search (see `flat.rs`); written with the store.
pub struct ExactCodes {
    pub codes: Lines,
    pub sums: Vec<AtomicI32>,
    pub scales: Vec<AtomicU32>,
    /// Error bound coefficients (f32 bits): of `|q|` and of `|q - q~|`.
    pub err_q: Vec<AtomicU32>,
    pub err_r: Vec<AtomicU32>,
}

impl ExactCodes {
    pub fn new(padded: usize) -> Self {
        ExactCodes {
            codes: Lines::new(padded),
            sums: Vec::new(),
            scales: Vec::new(),
            err_q: Vec::new(),
            err_r: Vec::new(),
        }
    }

    pub fn grow(&mut self, slots: usize) {
        self.codes.grow(slots);
        self.sums.resize_with(slots, Default::default);
        self.scales.resize_with(slots, Default::default);
        self.err_q.resize_with(slots, Default::default);
        self.err_r.resize_with(slots, Default::default);
    }

    /// Encodes the stored vector `v` (`dim` values) of an unpublished slot.
    /// `slack` is the relative rounding error allowed for of both f32 dot
    /// products (see `flat.rs`).
    pub fn write(&self, slot: usize, v: &[f32], slack: f64) {
        let (scale, codes) = quantise_i8(v);
        let (mut resid, mut coded, mut norm) = (0.0f64, 0.0f64, 0.0f64);
        for (&x, &c) in v.iter().zip(&codes) {
            let y = f64::from(scale) * f64::from(c);
            resid += (f64::from(x) - y).powi(2);
            coded += y * y;
            norm += f64::from(x).powi(2);
        }
        let up = |x: f64| (x * (1.0 + 1e-6)) as f32;
        self.codes.write(slot, 0, pack_i8(&codes));
        self.sums[slot].store(codes.iter().map(|&c| i32::from(c)).sum(), Ordering::Relaxed);
        self.scales[slot].store(scale.to_bits(), Ordering::Relaxed);
        let err_q = resid.sqrt() + slack * (norm.sqrt() + coded.sqrt());
        self.err_q[slot].store(up(err_q).to_bits(), Ordering::Relaxed);
        self.err_r[slot].store(up(coded.sqrt()).to_bits(), Ordering::Relaxed);
    }
}

/// Reads an f32 stored as bits in an atomic word.
pub fn load_f32(w: &AtomicU32) -> f32 {
    f32::from_bits(w.load(Ordering::Relaxed))
}
