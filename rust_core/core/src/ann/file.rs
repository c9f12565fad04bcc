//! The on-disk format of an [`AnnIndex`]: the shared [`envelope`](crate::envelope)
//! with magic `b"TGANNIDX"`, a JSON header of settings and entry count, and
//! this payload.
//!
//! Version 2 (our own HNSW; version 1 held usearch's serialisation), payload
//! little-endian:
//!
//! ```text
//! slots        u64      slots that follow, live and removed
//! graph        u8       1 if the graph follows (0: the index is small and exact)
//! entry        u32, u8  slot and level of the graph's entry point (graph only)
//! per slot     id u64, state u8 (1 live, 2 removed),
//!              vector: dim x f32 (dtype f32) or scale f32 + dim x i8 (dtype i8),
//!              graph only: level u8, then per layer 0..=level: count u32, count x slot u32
//! ```
//!
//! The graph is saved as it is, so loading does not rebuild it and answers
//! exactly as the saved index did. `load` checks size, magic, version and
//! checksum before reading the payload, then every count, slot, level and
//! value in it, so a truncated, corrupted or foreign file is an error that
//! names the path, never a crash or a silently wrong index. (The checksum
//! guards against accidents, not against a forger: load only files you wrote.)

use std::path::Path;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::flat::slack;
use super::hnsw::MAX_LEVEL;
use super::store::{DELETED, LIVE};
use super::{AnnConfig, AnnIndex, Inner, Metric, Storage};
use crate::envelope::{self, Kind, Reader};
use crate::{Error, Result};

pub const MAGIC: &[u8; 8] = b"TGANNIDX";
pub const FORMAT_VERSION: u32 = 2;
const KIND: Kind = Kind {
    magic: MAGIC,
    version: FORMAT_VERSION,
    what: "a tiergate ANN index",
    on_old_version: "rebuild the index from its vectors",
};

#[derive(Serialize, Deserialize)]
struct Header {
    dim: usize,
    metric: String,
    dtype: String,
    connectivity: usize,
    ef_construction: usize,
    ef_search: usize,
    exact_below: usize,
    count: usize,
}

fn payload(inner: &Inner) -> Vec<u8> {
    let store = &inner.store;
    let n = store.published();
    let mut out = Vec::with_capacity(16 + n * (16 + store.dim * 4));
    out.extend_from_slice(&(n as u64).to_le_bytes());
    out.push(u8::from(inner.graph.is_some()));
    if let Some(g) = &inner.graph {
        let (slot, level) = g.entry().map_or((u32::MAX, 0), |(s, l)| (s, l));
        out.extend_from_slice(&slot.to_le_bytes());
        out.push(level as u8);
    }
    let mut buf = Vec::new();
    for s in 0..n {
        out.extend_from_slice(&store.id(s).to_le_bytes());
        out.push(if store.is_live(s) { LIVE } else { DELETED });
        if store.keeps_f32() {
            store.vector_into(s, &mut buf);
            for x in &buf[..store.dim] {
                out.extend_from_slice(&x.to_le_bytes());
            }
        } else {
            let (scale, codes) = store.codes_i8(s);
            out.extend_from_slice(&scale.to_le_bytes());
            out.extend(codes.iter().map(|&c| c as u8));
        }
        if let Some(g) = &inner.graph {
            let level = g.level(s as u32);
            out.push(level as u8);
            for layer in 0..=level {
                let links: Vec<u32> = g.neighbours(store, s as u32, layer).collect();
                out.extend_from_slice(&(links.len() as u32).to_le_bytes());
                for l in links {
                    out.extend_from_slice(&l.to_le_bytes());
                }
            }
        }
    }
    out
}

/// Rebuilds the index state from a version-2 payload, checking everything.
fn read_payload(config: &AnnConfig, bytes: &[u8]) -> std::result::Result<Inner, String> {
    let mut r = Reader::new(bytes);
    let n = r.u64()?;
    // Every slot takes an id, a state and its vector: a count the payload
    // cannot hold is corrupt, and must not size an allocation.
    let dim = config.dim as u64;
    let min_slot = 9 + match config.storage {
        Storage::F32 => 4 * dim,
        Storage::I8 => 4 + dim,
    };
    if n.saturating_mul(min_slot) > bytes.len() as u64 || n >= u64::from(u32::MAX) {
        return Err(format!("payload claims {n} slots, more than it can hold"));
    }
    // Memory per slot (vector copies and a full link list) can far exceed its
    // bytes on disk when dim is tiny and m large: bound what a file may make us
    // allocate, so a forged file gets an error, not an out-of-memory kill.
    let per_slot = 7 * dim + 8 * config.connectivity as u64 + 128;
    let budget = (bytes.len() as u64).saturating_mul(64).max(256 << 20);
    if n.saturating_mul(per_slot) > budget {
        return Err(format!(
            "payload claims {n} slots, which would need far more memory than its size justifies"
        ));
    }
    let n = n as usize;
    let with_graph = match r.u8()? {
        0 => false,
        1 => true,
        other => return Err(format!("graph flag is {other}, not 0 or 1")),
    };
    let entry = if with_graph {
        Some((r.u32()?, r.u8()? as usize))
    } else {
        None
    };
    let mut inner = Inner::new(config, with_graph);
    inner.grow(n.max(64));
    let store = &inner.store;
    store.take_slots(n);
    let mut states = Vec::with_capacity(n);
    let mut lists: Vec<Vec<Vec<u32>>> = Vec::with_capacity(if with_graph { n } else { 0 });
    let mut v = vec![0.0f32; config.dim];
    let mut buf = Vec::new();
    let slack = slack(store.padded);
    for s in 0..n {
        let id = r.u64()?;
        let state = r.u8()?;
        if state != LIVE && state != DELETED {
            return Err(format!("slot {s} has state {state}"));
        }
        states.push((id, state));
        match config.storage {
            Storage::F32 => {
                for x in v.iter_mut() {
                    *x = r.f32()?;
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(format!("slot {s} holds a value that is not finite"));
                }
                store.write(s, id, &v);
            }
            Storage::I8 => {
                let scale = r.f32()?;
                if !(scale.is_finite() && scale > 0.0) {
                    return Err(format!("slot {s} has scale {scale}"));
                }
                let codes: Vec<i8> = r.take(config.dim)?.iter().map(|&b| b as i8).collect();
                store.write_i8(s, id, scale, &codes);
            }
        }
        if let Some(e) = &inner.exact {
            store.vector_into(s, &mut buf);
            e.write(s, &buf[..config.dim], slack);
        }
        if let Some(g) = &inner.graph {
            let level = r.u8()? as usize;
            if level > MAX_LEVEL {
                return Err(format!("slot {s} has level {level} (at most {MAX_LEVEL})"));
            }
            let mut node = Vec::with_capacity(level + 1);
            for layer in 0..=level {
                let count = r.u32()? as usize;
                if count > g.max_links(layer) {
                    return Err(format!("slot {s} has {count} links at layer {layer}"));
                }
                let mut links = Vec::with_capacity(count);
                for _ in 0..count {
                    let l = r.u32()?;
                    if l as usize >= n || l as usize == s {
                        return Err(format!("slot {s} links to slot {l} of {n}"));
                    }
                    links.push(l);
                }
                node.push(links);
            }
            lists.push(node);
        }
    }
    if r.remaining() > 0 {
        return Err(format!("{} bytes follow the last slot", r.remaining()));
    }
    store.publish(n);
    if let Some(g) = &inner.graph {
        for (s, node) in lists.iter().enumerate() {
            g.restore(&inner.store, s as u32, node);
        }
        match entry {
            Some((slot, level)) if (slot as usize) < n => {
                if lists[slot as usize].len() != level + 1 {
                    return Err(format!("entry point {slot} is not at level {level}"));
                }
                g.restore_entry(slot, level);
            }
            Some((u32::MAX, _)) if n == 0 => {}
            Some((slot, _)) => return Err(format!("entry point {slot} of {n} slots")),
            None => {}
        }
    }
    {
        let mut slots = inner.slots.write();
        for (s, &(id, state)) in states.iter().enumerate() {
            if state == LIVE && (id == u64::MAX || slots.insert(id, s as u32).is_some()) {
                return Err(format!("id {id} is reserved or live twice"));
            }
            inner.store.set_state(s, state);
        }
    }
    Ok(inner)
}

impl AnnIndex {
    /// Writes the index to `path` atomically (a temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let _writer = self.writer.lock();
        let inner = self.inner.read();
        let payload = payload(&inner);
        let c = &self.config;
        let header = serde_json::to_vec(&Header {
            dim: c.dim,
            metric: c.metric.name().into(),
            dtype: c.storage.name().into(),
            connectivity: c.connectivity,
            ef_construction: c.ef_construction,
            ef_search: c.ef_search,
            exact_below: c.exact_below,
            count: inner.store.live(),
        })
        .expect("header serialises");
        drop(inner);
        envelope::write(path, &KIND, &header, &payload)
    }

    /// Reads an index written by [`AnnIndex::save`].
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_opened(envelope::read(path, &KIND)?, path)
    }

    /// [`load`](Self::load) from bytes in memory (errors name `<bytes>`): for
    /// fuzzing, and callers that hold the file already.
    pub fn load_bytes(bytes: Vec<u8>) -> Result<Self> {
        let name = Path::new("<bytes>");
        Self::from_opened(envelope::open(bytes, name, &KIND)?, name)
    }

    fn from_opened(opened: envelope::Opened, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::format(path, reason);
        let header: Header = serde_json::from_slice(opened.header())
            .map_err(|e| bad(format!("header is not valid: {e}")))?;
        let config = AnnConfig {
            dim: header.dim,
            metric: Metric::parse(&header.metric).map_err(|e| bad(e.to_string()))?,
            storage: Storage::parse(&header.dtype).map_err(|e| bad(e.to_string()))?,
            connectivity: header.connectivity,
            ef_construction: header.ef_construction,
            ef_search: header.ef_search,
            exact_below: header.exact_below,
        };
        config.validate().map_err(|e| bad(e.to_string()))?;
        let inner = read_payload(&config, opened.payload()).map_err(bad)?;
        if inner.store.live() != header.count {
            return Err(bad(format!(
                "payload holds {} live entries, header says {}",
                inner.store.live(),
                header.count
            )));
        }
        let index = AnnIndex {
            config,
            inner: RwLock::new(inner),
            writer: Mutex::new(()),
        };
        {
            let _writer = index.writer.lock();
            index.build_graph_if_due();
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(dir: &Path) -> (std::path::PathBuf, AnnIndex) {
        let idx = AnnIndex::new(AnnConfig::new(4)).unwrap();
        idx.add(
            &[1, 2, 3],
            &[1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0.5],
        )
        .unwrap();
        let path = dir.join("index.tgann");
        idx.save(&path).unwrap();
        (path, idx)
    }

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tiergate-ann-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_gives_the_same_answers() {
        let dir = tmpdir("rt");
        let (path, idx) = saved(&dir);
        let back = AnnIndex::load(&path).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back.config(), idx.config());
        let q = [0.1, 0.9, 0.0, 0.0];
        // The same neighbours with the same scores.
        let (a, b) = (
            back.search(&q, 3, None).unwrap(),
            idx.search(&q, 3, None).unwrap(),
        );
        assert_eq!(a.ids, b.ids);
        for (x, y) in a.scores.iter().zip(&b.scores) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    fn vectors(n: usize, dim: usize) -> Vec<f32> {
        (0..n * dim)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn graph_and_int8_round_trips_answer_identically() {
        let dir = tmpdir("graph");
        for storage in [Storage::F32, Storage::I8] {
            let mut config = AnnConfig::new(12);
            config.exact_below = 0;
            config.storage = storage;
            let idx = AnnIndex::new(config).unwrap();
            let data = vectors(1500, 12);
            idx.add(&(0..1500).collect::<Vec<_>>(), &data).unwrap();
            idx.remove(&[3, 4, 5]).unwrap();
            let path = dir.join(format!("{}.tgann", storage.name()));
            idx.save(&path).unwrap();
            let back = AnnIndex::load(&path).unwrap();
            assert_eq!(
                (back.len(), back.contains(3), back.contains(6)),
                (1497, false, true)
            );
            let (a, b) = (
                idx.search(&data[..40 * 12], 7, None).unwrap(),
                back.search(&data[..40 * 12], 7, None).unwrap(),
            );
            assert_eq!(a, b, "{storage:?}");
            assert_eq!(idx.get(6), back.get(6));
        }
    }

    /// Rewrites `file` with `edit` applied to its payload and a fresh checksum,
    /// as a forger (or a bug) would.
    fn forged(file: &[u8], edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
        let header_len = u32::from_le_bytes(file[12..16].try_into().unwrap()) as usize;
        let at = 16 + header_len + 8;
        let mut payload = file[at..file.len() - 4].to_vec();
        edit(&mut payload);
        let mut out = file[..at - 8].to_vec();
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn a_payload_that_passes_the_checksum_is_still_checked() {
        let dir = tmpdir("forged");
        let mut config = AnnConfig::new(4);
        config.exact_below = 0;
        let idx = AnnIndex::new(config).unwrap();
        idx.add(&[7, 8, 9], &vectors(3, 4)).unwrap();
        let path = dir.join("good.tgann");
        idx.save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        // Payload: slots u64, graph u8, entry u32 + u8, then slot 0: id u64,
        // state u8, 4 x f32, level u8, count u32, links.
        let slot0 = 8 + 1 + 5;
        let links_at = slot0 + 8 + 1 + 16 + 1;
        type Edit = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(move |p| p[..8].copy_from_slice(&u64::MAX.to_le_bytes())),
                "slots",
            ),
            (Box::new(move |p| p[8] = 5), "graph flag"),
            (Box::new(move |p| p[slot0 + 8] = 9), "state 9"),
            (
                Box::new(move |p| {
                    p[slot0 + 9..slot0 + 13].copy_from_slice(&f32::NAN.to_le_bytes())
                }),
                "not finite",
            ),
            (Box::new(move |p| p[links_at - 1] = 200), "level 200"),
            (
                Box::new(move |p| {
                    p[links_at..links_at + 4].copy_from_slice(&1000u32.to_le_bytes())
                }),
                "links at layer 0",
            ),
            (
                Box::new(move |p| {
                    p[links_at + 4..links_at + 8].copy_from_slice(&77u32.to_le_bytes())
                }),
                "links to slot 77",
            ),
            (
                Box::new(move |p| p[9..13].copy_from_slice(&50u32.to_le_bytes())),
                "entry point 50",
            ),
            (
                Box::new(move |p| p.truncate(p.len() - 3)),
                "ends in the middle",
            ),
            (Box::new(move |p| p.push(0)), "follow the last slot"),
            (
                Box::new(move |p| p[slot0..slot0 + 8].copy_from_slice(&9u64.to_le_bytes())),
                "live twice",
            ),
        ];
        for (i, (edit, expected)) in cases.into_iter().enumerate() {
            let p = dir.join(format!("forged{i}.tgann"));
            std::fs::write(&p, forged(&good, edit)).unwrap();
            let e = AnnIndex::load(&p).unwrap_err();
            assert!(matches!(e, Error::Format { .. }), "case {i}: {e}");
            assert!(e.to_string().contains(expected), "case {i}: {e}");
        }
    }

    /// Mutated files (see `envelope::testing`) are errors or valid indexes
    /// that answer searches, never panics. Both graph and exact layouts.
    #[test]
    fn mutated_indexes_never_panic() {
        let dir = tmpdir("fuzz");
        for (n, name) in [(6u64, "exact"), (80, "graph")] {
            let mut config = AnnConfig::new(4);
            config.exact_below = 16;
            let idx = AnnIndex::new(config).unwrap();
            let ids: Vec<u64> = (0..n).collect();
            idx.add(&ids, &vectors(n as usize, 4)).unwrap();
            let path = dir.join(format!("{name}.tgann"));
            idx.save(&path).unwrap();
            let good = std::fs::read(&path).unwrap();
            let mutant = dir.join(format!("{name}.mutant"));
            let (mut errors, mut loaded) = (0, 0);
            for m in crate::envelope::testing::mutants(&good, 1500) {
                std::fs::write(&mutant, &m).unwrap();
                match AnnIndex::load(&mutant) {
                    Ok(back) => {
                        back.search(&[0.5, 0.5, 0.1, 0.0], 3, None).unwrap();
                        loaded += 1;
                    }
                    Err(e) => {
                        assert!(matches!(e, Error::Format { .. }), "{name}: {e}");
                        errors += 1;
                    }
                }
            }
            assert!(
                errors > 500 && loaded > 0,
                "{name}: {errors} errors, {loaded} loaded"
            );
        }
    }

    #[test]
    fn a_forged_slot_count_cannot_demand_huge_memory() {
        // dim 1 and m 256: each slot costs ~2 KB in memory but 13 bytes on disk.
        let dir = tmpdir("huge");
        let mut config = AnnConfig::new(1);
        config.connectivity = 256;
        let idx = AnnIndex::new(config).unwrap();
        idx.add(&[1, 2], &[0.5, -0.5]).unwrap();
        let path = dir.join("small.tgann");
        idx.save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let bloated = forged(&good, |p| {
            p.resize(4 << 20, 0);
            let n = (p.len() / 13) as u64;
            p[..8].copy_from_slice(&n.to_le_bytes());
        });
        let p = dir.join("bloated.tgann");
        std::fs::write(&p, bloated).unwrap();
        let e = AnnIndex::load(&p).unwrap_err().to_string();
        assert!(e.contains("more memory than its size justifies"), "{e}");
    }

    #[test]
    fn every_kind_of_damage_is_a_format_error() {
        let dir = tmpdir("dmg");
        let (path, _) = saved(&dir);
        let good = std::fs::read(&path).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..good.len() - 7].to_vec(), "payload should be"),
            (good[..10].to_vec(), "too short"),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "magic",
            ),
            (
                {
                    let mut b = good.clone();
                    b[8] = 9;
                    b
                },
                "version 9",
            ),
            (
                {
                    let mut b = good.clone();
                    let n = b.len();
                    b[n - 20] ^= 0xFF;
                    b
                },
                "checksum",
            ),
            (
                {
                    let mut b = good.clone();
                    b[12] = 0xFF;
                    b[13] = 0xFF;
                    b
                },
                "past the end",
            ),
        ];
        for (i, (bytes, expected)) in cases.into_iter().enumerate() {
            let p = dir.join(format!("bad{i}.tgann"));
            std::fs::write(&p, bytes).unwrap();
            let e = AnnIndex::load(&p).unwrap_err();
            assert!(matches!(e, Error::Format { .. }), "case {i}: {e}");
            assert!(e.to_string().contains(expected), "case {i}: {e}");
        }
        assert!(matches!(
            AnnIndex::load(&dir.join("missing")),
            Err(Error::Io { .. })
        ));
    }
}
