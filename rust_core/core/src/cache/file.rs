//! Cache snapshots: the entries of a [`SemanticCache`] written to one file and
//! read back after a restart, so a restart does not throw away answers that
//! cost a frontier call each.
//!
//! The shared [`envelope`](crate::envelope) with magic `b"TGSCACHE"`, a JSON
//! header (dim, metric, when it was saved, entry count), and this payload,
//! little-endian:
//!
//! ```text
//! namespaces   u32
//! per namespace  name_len u32, name (UTF-8), entries u64,
//!                per entry, least recently used first:
//!                age f64 (seconds since it was stored), value_len u32, value, dim x f32
//! ```
//!
//! Ages are kept rather than times because the cache's clock is monotonic and
//! starts again with the process; the header's wall-clock save time adds the
//! downtime, so a TTL counts the hours the server was off. A snapshot is
//! parsed and checked whole before any entry goes in: a corrupt file restores
//! nothing and names itself in the error.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::SemanticCache;
use crate::ann::{check_vectors, Metric};
use crate::envelope::{self, Kind, Reader};
use crate::{Error, Result};

pub const MAGIC: &[u8; 8] = b"TGSCACHE";
pub const FORMAT_VERSION: u32 = 1;
const KIND: Kind = Kind {
    magic: MAGIC,
    version: FORMAT_VERSION,
    what: "a tiergate cache snapshot",
    on_old_version: "delete it: the cache refills as requests arrive",
};

#[derive(Serialize, Deserialize)]
struct Header {
    dim: usize,
    metric: String,
    saved_at_unix: f64,
    entries: u64,
}

struct Saved {
    age: f64,
    value: Vec<u8>,
    vector: Vec<f32>,
}

/// Wall-clock seconds since the epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl SemanticCache {
    /// Writes every live entry to `path` atomically; returns how many.
    pub fn save(&self, path: &Path) -> Result<usize> {
        self.save_at(path, unix_now())
    }

    /// [`save`](Self::save) with the wall clock given (tests travel in time).
    pub fn save_at(&self, path: &Path, unix_now: f64) -> Result<usize> {
        let now = (self.clock)();
        let namespaces: Vec<(String, std::sync::Arc<super::Namespace>)> = {
            let all = self.namespaces.read();
            let mut v: Vec<_> = all.iter().map(|(k, ns)| (k.clone(), ns.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let mut payload = Vec::new();
        payload.extend_from_slice(&(namespaces.len() as u32).to_le_bytes());
        let mut total = 0u64;
        for (name, ns) in &namespaces {
            let state = ns.state.lock();
            // LruCache iterates most recent first: reversed, a restore that
            // inserts in file order rebuilds the same recency.
            let live: Vec<(f64, &[u8], Vec<f32>)> = state
                .entries
                .iter()
                .rev()
                .filter(|(_, e)| !self.expired(e, now))
                .filter_map(|(&id, e)| {
                    let v = ns.index.get(id)?;
                    Some(((now - e.stored_at).max(0.0), &e.value[..], v))
                })
                .collect();
            payload.extend_from_slice(&(name.len() as u32).to_le_bytes());
            payload.extend_from_slice(name.as_bytes());
            payload.extend_from_slice(&(live.len() as u64).to_le_bytes());
            for (age, value, vector) in &live {
                payload.extend_from_slice(&age.to_le_bytes());
                payload.extend_from_slice(&(value.len() as u32).to_le_bytes());
                payload.extend_from_slice(value);
                for x in vector {
                    payload.extend_from_slice(&x.to_le_bytes());
                }
            }
            total += live.len() as u64;
        }
        let header = serde_json::to_vec(&Header {
            dim: self.config.dim,
            metric: self.config.metric.name().into(),
            saved_at_unix: unix_now,
            entries: total,
        })
        .expect("header serialises");
        envelope::write(path, &KIND, &header, &payload)?;
        Ok(total as usize)
    }

    /// Adds the entries of the snapshot at `path`; returns how many were still
    /// live (not past the TTL, counting the time since the save). Entries past
    /// a namespace's capacity keep the most recent.
    pub fn restore(&self, path: &Path) -> Result<usize> {
        self.restore_at(path, unix_now())
    }

    /// [`restore`](Self::restore) with the wall clock given.
    pub fn restore_at(&self, path: &Path, unix_now: f64) -> Result<usize> {
        self.restore_opened(envelope::read(path, &KIND)?, path, unix_now)
    }

    /// [`restore_at`](Self::restore_at) from bytes in memory (errors name `<bytes>`).
    pub fn restore_bytes(&self, bytes: Vec<u8>, unix_now: f64) -> Result<usize> {
        let name = Path::new("<bytes>");
        self.restore_opened(envelope::open(bytes, name, &KIND)?, name, unix_now)
    }

    fn restore_opened(
        &self,
        opened: envelope::Opened,
        path: &Path,
        unix_now: f64,
    ) -> Result<usize> {
        let bad = |reason: String| Error::format(path, reason);
        let header: Header = serde_json::from_slice(opened.header())
            .map_err(|e| bad(format!("header is not valid: {e}")))?;
        if header.dim != self.config.dim {
            return Err(bad(format!(
                "the snapshot holds vectors of dim {}, this cache takes dim {} (another embedding model?)",
                header.dim, self.config.dim
            )));
        }
        let metric = Metric::parse(&header.metric).map_err(|e| bad(e.to_string()))?;
        if metric != self.config.metric {
            return Err(bad(format!(
                "the snapshot was made with metric {}, this cache uses {}",
                metric.name(),
                self.config.metric.name()
            )));
        }
        if !header.saved_at_unix.is_finite() {
            return Err(bad("the save time is not a number".into()));
        }
        let namespaces = self.read_payload(opened.payload()).map_err(bad)?;
        let found: u64 = namespaces.iter().map(|(_, e)| e.len() as u64).sum();
        if found != header.entries {
            return Err(bad(format!(
                "payload holds {found} entries, header says {}",
                header.entries
            )));
        }
        // A clock set back makes no negative downtime.
        let downtime = (unix_now - header.saved_at_unix).max(0.0);
        let now = (self.clock)();
        let mut restored = 0;
        for (name, entries) in namespaces {
            let skip = entries.len().saturating_sub(self.config.capacity);
            for e in entries.into_iter().skip(skip) {
                let age = e.age + downtime;
                if self.config.ttl_seconds.is_some_and(|ttl| age >= ttl) {
                    continue;
                }
                self.insert(&name, &e.vector, &e.value, now - age)?;
                restored += 1;
            }
        }
        Ok(restored)
    }

    fn read_payload(&self, bytes: &[u8]) -> std::result::Result<Vec<(String, Vec<Saved>)>, String> {
        let dim = self.config.dim;
        let mut r = Reader::new(bytes);
        let n = r.u32()? as usize;
        if n.saturating_mul(12) > r.remaining() {
            return Err(format!(
                "payload claims {n} namespaces, more than it can hold"
            ));
        }
        let mut out = Vec::with_capacity(n);
        let mut seen = std::collections::HashSet::new();
        for i in 0..n {
            let len = r.u32()? as usize;
            let name = std::str::from_utf8(r.take(len)?)
                .map_err(|_| format!("namespace {i} has a name that is not UTF-8"))?
                .to_owned();
            if !seen.insert(name.clone()) {
                return Err(format!("namespace {name:?} appears twice"));
            }
            let count = r.u64()?;
            // Each entry holds at least an age, a length and its vector: a count
            // the payload cannot hold is corrupt and must not size an allocation.
            let min_entry = 12 + 4 * dim as u64;
            if count.saturating_mul(min_entry) > r.remaining() as u64 {
                return Err(format!(
                    "namespace {name:?} claims {count} entries, more than the payload holds"
                ));
            }
            let mut entries = Vec::with_capacity(count as usize);
            for j in 0..count {
                let age = r.f64()?;
                if !(age.is_finite() && age >= 0.0) {
                    return Err(format!("entry {j} of {name:?} has age {age}"));
                }
                let value_len = r.u32()? as usize;
                let value = r.take(value_len)?.to_vec();
                let mut vector = Vec::with_capacity(dim);
                for _ in 0..dim {
                    vector.push(r.f32()?);
                }
                check_vectors(&vector, dim, self.config.metric, "vector")
                    .map_err(|e| format!("entry {j} of {name:?}: {e}"))?;
                entries.push(Saved { age, value, vector });
            }
            out.push((name, entries));
        }
        if r.remaining() > 0 {
            return Err(format!("{} bytes follow the last entry", r.remaining()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::cache;
    use crate::cache::CacheConfig;
    use std::sync::atomic::Ordering;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tiergate-cache-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join("cache.tgcache")
    }

    fn value(c: &SemanticCache, ns: &str, v: &[f32]) -> Option<Vec<u8>> {
        c.get(ns, v).unwrap().map(|h| h.value.to_vec())
    }

    #[test]
    fn a_restored_cache_answers_as_the_saved_one_per_namespace() {
        let path = tmp("rt");
        let (a, _) = cache(10, None);
        a.put("t1", &[1.0, 0.0, 0.0], b"refund").unwrap();
        a.put("t2", &[0.0, 1.0, 0.0], b"balance").unwrap();
        assert_eq!(a.save_at(&path, 1000.0).unwrap(), 2);
        let (b, _) = cache(10, None);
        assert_eq!(b.restore_at(&path, 1000.0).unwrap(), 2);
        assert_eq!(
            value(&b, "t1", &[1.0, 0.01, 0.0]).as_deref(),
            Some(&b"refund"[..])
        );
        assert_eq!(
            value(&b, "t2", &[0.0, 1.0, 0.0]).as_deref(),
            Some(&b"balance"[..])
        );
        // Isolation survives the round trip: t1 never sees t2's entry.
        assert_eq!(value(&b, "t1", &[0.0, 1.0, 0.0]), None);
    }

    #[test]
    fn downtime_counts_against_the_ttl_and_recency_survives() {
        let path = tmp("ttl");
        let (a, now) = cache(10, Some(100.0));
        a.put("t", &[1.0, 0.0, 0.0], b"old").unwrap();
        now.store(60, Ordering::SeqCst);
        a.put("t", &[0.0, 1.0, 0.0], b"new").unwrap();
        a.save_at(&path, 5_000.0).unwrap();
        // 30 s later: "old" is 90 s old, "new" 30 s; 50 s later "old" is gone.
        let (b, _) = cache(10, Some(100.0));
        assert_eq!(b.restore_at(&path, 5_030.0).unwrap(), 2);
        let (c, _) = cache(10, Some(100.0));
        assert_eq!(c.restore_at(&path, 5_050.0).unwrap(), 1);
        assert_eq!(
            value(&c, "t", &[0.0, 1.0, 0.0]).as_deref(),
            Some(&b"new"[..])
        );
        // Capacity 1 keeps the most recently used entry.
        let (d, _) = cache(1, Some(100.0));
        assert_eq!(d.restore_at(&path, 5_000.0).unwrap(), 1);
        assert_eq!(
            value(&d, "t", &[0.0, 1.0, 0.0]).as_deref(),
            Some(&b"new"[..])
        );
    }

    #[test]
    fn a_snapshot_for_another_model_is_refused() {
        let path = tmp("dim");
        let (a, _) = cache(10, None);
        a.put("t", &[1.0, 0.0, 0.0], b"x").unwrap();
        a.save(&path).unwrap();
        let other = SemanticCache::new(CacheConfig {
            dim: 4,
            metric: Metric::Cosine,
            threshold: 0.9,
            ttl_seconds: None,
            capacity: 10,
        })
        .unwrap();
        let e = other.restore(&path).unwrap_err().to_string();
        assert!(e.contains("dim 3") && e.contains("cache.tgcache"), "{e}");
    }

    /// Every mutant is an error or a valid cache, never a panic, and an error
    /// leaves the cache empty.
    #[test]
    fn mutated_snapshots_never_panic_or_half_restore() {
        let path = tmp("fuzz");
        let (a, _) = cache(10, None);
        for i in 0..4 {
            let x = i as f32;
            a.put(
                &format!("ns{i}"),
                &[1.0, x, 0.5],
                format!("label{i}").as_bytes(),
            )
            .unwrap();
        }
        a.save_at(&path, 1000.0).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mutant_path = path.with_extension("mutant");
        let (mut errors, mut restored) = (0, 0);
        for m in crate::envelope::testing::mutants(&good, 3000) {
            std::fs::write(&mutant_path, &m).unwrap();
            let (b, _) = cache(10, None);
            match b.restore_at(&mutant_path, 1000.0) {
                Ok(n) => {
                    assert_eq!(b.len(), n);
                    restored += 1;
                }
                Err(e) => {
                    assert!(matches!(e, Error::Format { .. }), "{e}");
                    assert_eq!(b.len(), 0, "an error must restore nothing: {e}");
                    errors += 1;
                }
            }
        }
        // Both outcomes occur: the fuzzer reaches past the envelope.
        assert!(errors > 1000, "{errors} errors");
        assert!(
            restored > 0,
            "no mutant restored: the payload reader was never reached"
        );
    }
}
