//! The HNSW graph (Malkov & Yashunin, 2018) over the slots of a [`Store`],
//! laid out like hnswlib: a node's layer-0 list (`[count, 2M slots]`) sits in
//! the store's block for the node, right before the codes the walk reads, so
//! the one prefetch that brings a node's codes in brings its neighbours too;
//! upper layers are allocated per node.
//!
//! Concurrency: searches take no lock. Every neighbour list is a run of
//! atomic words; a writer changes a list only under that node's mutex (never
//! holding two), stores the slots before the count, and both with Release, so
//! a reader that loads the count and then the slots (Acquire) sees slot ids
//! that are all real nodes (old or new ones: a list read mid-update is a mix of
//! two valid lists, which a search tolerates). A node becomes reachable only
//! when a back-link to it is stored, after its own data was published (see
//! `store.rs`) and its own lists written. The entry point is one atomic word,
//! raised under `entry_lock`.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::sync::OnceLock;

use parking_lot::Mutex;

use super::store::Store;

/// Levels above this are cut (a level that high is a 1 in 16^16 draw at M=16).
pub const MAX_LEVEL: usize = 16;
const NO_ENTRY: u64 = u64::MAX;

/// A node and its similarity to the query; ordered by similarity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Near {
    pub sim: f32,
    pub slot: u32,
}

impl Eq for Near {}

impl PartialOrd for Near {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Near {
    fn cmp(&self, other: &Self) -> Ordering {
        self.sim
            .total_cmp(&other.sim)
            .then(other.slot.cmp(&self.slot))
    }
}

/// Marks of the nodes a search has seen: an epoch per node, so clearing is
/// one increment (and a real clear every 65,535 searches).
struct Visited {
    tags: Vec<u16>,
    epoch: u16,
}

impl Visited {
    fn reset(&mut self, n: usize) {
        if self.tags.len() < n {
            self.tags.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.tags.fill(0);
            self.epoch = 1;
        }
    }

    #[inline]
    fn insert(&mut self, slot: u32) -> bool {
        let t = &mut self.tags[slot as usize];
        let new = *t != self.epoch;
        *t = self.epoch;
        new
    }
}

/// What one layer search keeps: the `ef` best at `layer`, live ones only
/// for queries (inserts link to removed nodes too, as hnswlib does).
#[derive(Clone, Copy)]
struct Beam {
    ef: usize,
    layer: usize,
    live_only: bool,
}

pub struct Graph {
    m: usize,
    m0: usize,
    ef_construction: usize,
    level_mult: f64,
    levels: Vec<AtomicU8>,
    /// Lists of layers 1..=level, `[count, M slots]` each.
    upper: Vec<OnceLock<Box<[AtomicU32]>>>,
    locks: Vec<Mutex<()>>,
    /// `level << 32 | slot`, or `NO_ENTRY`.
    entry: AtomicU64,
    entry_lock: Mutex<()>,
    visited: Mutex<Vec<Visited>>,
}

/// A deterministic level per slot: the same graph shape whatever the thread
/// interleaving (splitmix64 of the slot number, then the usual -ln(U) * mL).
fn level_of(slot: u32, mult: f64) -> usize {
    let mut z = u64::from(slot).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = ((z >> 11) + 1) as f64 / (1u64 << 53) as f64;
    ((-u.ln() * mult) as usize).min(MAX_LEVEL)
}

impl Graph {
    pub fn new(m: usize, ef_construction: usize) -> Self {
        Graph {
            m,
            m0: 2 * m,
            ef_construction,
            level_mult: 1.0 / (m as f64).ln(),
            levels: Vec::new(),
            upper: Vec::new(),
            locks: Vec::new(),
            entry: AtomicU64::new(NO_ENTRY),
            entry_lock: Mutex::new(()),
            visited: Mutex::new(Vec::new()),
        }
    }

    pub fn grow(&mut self, slots: usize) {
        self.levels.resize_with(slots, Default::default);
        self.upper.resize_with(slots, Default::default);
        self.locks.resize_with(slots, Default::default);
    }

    /// `(slot, level)` of the entry point.
    pub fn entry(&self) -> Option<(u32, usize)> {
        let e = self.entry.load(Acquire);
        (e != NO_ENTRY).then_some(((e & 0xFFFF_FFFF) as u32, (e >> 32) as usize))
    }

    pub fn level(&self, slot: u32) -> usize {
        self.levels[slot as usize].load(Relaxed) as usize
    }

    /// The neighbour list of `slot` at `layer`: `[count, slots...]`, or empty
    /// if the node has no such layer.
    fn list<'a>(&'a self, store: &'a Store, slot: u32, layer: usize) -> &'a [AtomicU32] {
        if layer == 0 {
            store.links0(slot as usize)
        } else {
            let w = 1 + self.m;
            match self.upper[slot as usize].get() {
                Some(all) if all.len() >= layer * w => &all[(layer - 1) * w..layer * w],
                _ => &[],
            }
        }
    }

    /// Neighbours of `slot` at `layer` (a snapshot; see the module doc).
    pub fn neighbours<'a>(
        &'a self,
        store: &'a Store,
        slot: u32,
        layer: usize,
    ) -> impl Iterator<Item = u32> + 'a {
        let list = self.list(store, slot, layer);
        let count = list
            .first()
            .map_or(0, |c| (c.load(Acquire) as usize).min(list.len() - 1));
        list.get(1..1 + count)
            .unwrap_or_default()
            .iter()
            .map(|s| s.load(Acquire))
    }

    fn set_list(&self, store: &Store, slot: u32, layer: usize, nodes: &[u32]) {
        let list = self.list(store, slot, layer);
        assert!(nodes.len() < list.len(), "neighbour list overflow");
        for (cell, &n) in list[1..].iter().zip(nodes) {
            cell.store(n, Release);
        }
        list[0].store(nodes.len() as u32, Release);
    }

    fn take_visited(&self, n: usize) -> Visited {
        let mut v = self.visited.lock().pop().unwrap_or(Visited {
            tags: Vec::new(),
            epoch: 0,
        });
        v.reset(n);
        v
    }

    fn give_back(&self, v: Visited) {
        self.visited.lock().push(v);
    }

    fn greedy(&self, store: &Store, q: &[f32], mut cur: Near, layer: usize) -> Near {
        loop {
            let mut changed = false;
            for n in self.neighbours(store, cur.slot, layer) {
                let sim = store.sim(q, n as usize);
                if sim > cur.sim {
                    cur = Near { sim, slot: n };
                    changed = true;
                }
            }
            if !changed {
                return cur;
            }
        }
    }

    /// Best-first search of one layer from `entries`, keeping the `ef` best
    /// (live ones only if `live_only`); returns them best first.
    fn search_layer(
        &self,
        store: &Store,
        q: &[f32],
        entries: &[Near],
        beam: Beam,
        visited: &mut Visited,
    ) -> Vec<Near> {
        let Beam {
            ef,
            layer,
            live_only,
        } = beam;
        let mut candidates: BinaryHeap<Near> = BinaryHeap::with_capacity(4 * ef);
        let mut results: BinaryHeap<Reverse<Near>> = BinaryHeap::with_capacity(ef + 1);
        for &e in entries {
            if !visited.insert(e.slot) {
                continue;
            }
            candidates.push(e);
            if !live_only || store.is_live(e.slot as usize) {
                results.push(Reverse(e));
                if results.len() > ef {
                    results.pop();
                }
            }
        }
        let mut worst = results.peek().map_or(f32::NEG_INFINITY, |r| r.0.sim);
        let lines = store.block_lines();
        let mut fresh: Vec<u32> = Vec::with_capacity(self.m0);
        while let Some(c) = candidates.pop() {
            if c.sim < worst && results.len() >= ef {
                break;
            }
            fresh.clear();
            for n in self.neighbours(store, c.slot, layer) {
                if visited.insert(n) {
                    // The first line holds the list count: fetching it for
                    // every neighbour now measured faster than waiting.
                    store.prefetch(n as usize, 1);
                    fresh.push(n);
                }
            }
            for (i, &n) in fresh.iter().enumerate() {
                // The next one's codes stream in while this one is scored.
                if let Some(&next) = fresh.get(i + 1) {
                    store.prefetch(next as usize, lines);
                }
                let sim = store.sim(q, n as usize);
                if results.len() < ef || sim > worst {
                    let near = Near { sim, slot: n };
                    candidates.push(near);
                    if !live_only || store.is_live(n as usize) {
                        results.push(Reverse(near));
                        if results.len() > ef {
                            results.pop();
                        }
                        worst = results.peek().map_or(f32::NEG_INFINITY, |r| r.0.sim);
                    }
                }
            }
        }
        results.into_sorted_vec().into_iter().map(|r| r.0).collect()
    }

    /// Up to `ef` live nodes near the prepared query `q`, best first by the
    /// codes' similarity.
    pub fn search(&self, store: &Store, q: &[f32], ef: usize) -> Vec<Near> {
        let Some((slot, top)) = self.entry() else {
            return Vec::new();
        };
        let mut cur = Near {
            sim: store.sim(q, slot as usize),
            slot,
        };
        for layer in (1..=top).rev() {
            cur = self.greedy(store, q, cur, layer);
        }
        let mut visited = self.take_visited(self.levels.len());
        let beam = Beam {
            ef,
            layer: 0,
            live_only: true,
        };
        let found = self.search_layer(store, q, &[cur], beam, &mut visited);
        self.give_back(visited);
        found
    }

    /// Malkov & Yashunin's heuristic (algorithm 4, without extension or kept
    /// pruned): walk the candidates best first and keep one unless it is
    /// closer to a node already kept than to the base.
    fn select(&self, store: &Store, candidates: &[Near], max: usize) -> Vec<u32> {
        if candidates.len() <= max {
            return candidates.iter().map(|c| c.slot).collect();
        }
        let mut keep: Vec<u32> = Vec::with_capacity(max);
        let mut buf = Vec::new();
        for c in candidates {
            if keep.len() >= max {
                break;
            }
            let diverse = keep
                .iter()
                .all(|&r| store.sim_between(c.slot as usize, r as usize, &mut buf) <= c.sim);
            if diverse {
                keep.push(c.slot);
            }
        }
        keep
    }

    /// Adds `new` to `node`'s list at `layer`, shrinking a full list with the
    /// heuristic.
    fn link(&self, store: &Store, node: u32, new: u32, layer: usize) {
        let _guard = self.locks[node as usize].lock();
        let list = self.list(store, node, layer);
        let Some(max) = list.len().checked_sub(1) else {
            return;
        };
        let count = (list[0].load(Acquire) as usize).min(max);
        if count < max {
            list[1 + count].store(new, Release);
            list[0].store(count as u32 + 1, Release);
            return;
        }
        let mut buf = Vec::new();
        let mut candidates: Vec<Near> = list[1..=count]
            .iter()
            .map(|s| s.load(Acquire))
            .chain([new])
            .map(|s| Near {
                sim: store.sim_between(node as usize, s as usize, &mut buf),
                slot: s,
            })
            .collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        let keep = self.select(store, &candidates, max);
        self.set_list(store, node, layer, &keep);
    }

    /// Links the published slot `slot` into the graph. Safe to call from
    /// several threads at once, and while searches run.
    pub fn insert(&self, store: &Store, slot: u32) {
        let level = level_of(slot, self.level_mult);
        self.levels[slot as usize].store(level as u8, Relaxed);
        if level > 0 {
            let words = (0..level * (1 + self.m)).map(|_| AtomicU32::new(0));
            let _ = self.upper[slot as usize].set(words.collect());
        }
        let mut q = Vec::new();
        store.vector_into(slot as usize, &mut q);

        let (ep, top) = match self.entry() {
            Some(e) => e,
            None => {
                let _guard = self.entry_lock.lock();
                match self.entry() {
                    Some(e) => e,
                    None => {
                        self.entry.store(pack(slot, level), Release);
                        return;
                    }
                }
            }
        };
        let mut cur = Near {
            sim: store.sim(&q, ep as usize),
            slot: ep,
        };
        for layer in (level + 1..=top).rev() {
            cur = self.greedy(store, &q, cur, layer);
        }
        let mut visited = self.take_visited(self.levels.len());
        let mut entries = vec![cur];
        let mut chosen = Vec::new();
        for layer in (0..=level.min(top)).rev() {
            visited.reset(self.levels.len());
            let beam = Beam {
                ef: self.ef_construction,
                layer,
                live_only: false,
            };
            let found = self.search_layer(store, &q, &entries, beam, &mut visited);
            chosen.push((layer, self.select(store, &found, self.m)));
            entries = found;
        }
        self.give_back(visited);
        // Own lists first, then the back-links that make the node reachable.
        {
            let _guard = self.locks[slot as usize].lock();
            for (layer, keep) in &chosen {
                self.set_list(store, slot, *layer, keep);
            }
        }
        for (layer, keep) in &chosen {
            for &n in keep {
                self.link(store, n, slot, *layer);
            }
        }
        if level > top {
            let _guard = self.entry_lock.lock();
            if self.entry().is_none_or(|(_, l)| level > l) {
                self.entry.store(pack(slot, level), Release);
            }
        }
    }

    /// Restores a node from a file: its level and lists (already validated).
    pub fn restore(&self, store: &Store, slot: u32, lists: &[Vec<u32>]) {
        let level = lists.len() - 1;
        self.levels[slot as usize].store(level as u8, Relaxed);
        if level > 0 {
            let words = (0..level * (1 + self.m)).map(|_| AtomicU32::new(0));
            let _ = self.upper[slot as usize].set(words.collect());
        }
        for (layer, nodes) in lists.iter().enumerate() {
            self.set_list(store, slot, layer, nodes);
        }
    }

    pub fn restore_entry(&self, slot: u32, level: usize) {
        self.entry.store(pack(slot, level), Release);
    }

    /// The most neighbours a node may have at `layer`.
    pub fn max_links(&self, layer: usize) -> usize {
        if layer == 0 {
            self.m0
        } else {
            self.m
        }
    }
}

fn pack(slot: u32, level: usize) -> u64 {
    ((level as u64) << 32) | u64::from(slot)
}
