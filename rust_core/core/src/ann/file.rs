//! The on-disk format of an [`AnnIndex`], ours whatever the engine:
//!
//! ```text
//! magic        8 bytes  b"TGANNIDX"
//! version      u32 LE   FORMAT_VERSION
//! header_len   u32 LE
//! header       JSON     settings and entry count
//! payload_len  u64 LE
//! payload      bytes    the engine's own serialisation
//! crc32        u32 LE   over every byte above
//! ```
//!
//! `load` checks size, magic, version and checksum before the payload reaches
//! the engine, so a truncated or corrupted file is an error that names the
//! path, never a crash or a silently wrong index. (The checksum guards against
//! accidents, not against a forger: load only files you wrote.)

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{AnnConfig, AnnIndex, Metric, Storage};
use crate::{Error, Result};

pub const MAGIC: &[u8; 8] = b"TGANNIDX";
pub const FORMAT_VERSION: u32 = 1;
const FIXED: usize = 8 + 4 + 4 + 8 + 4;

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

impl AnnIndex {
    /// Writes the index to `path` atomically (a temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let _writer = self.writer.lock();
        let engine = self.engine.read();
        let mut payload = vec![0u8; engine.serialized_length()];
        engine
            .save_to_buffer(&mut payload)
            .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
        let c = &self.config;
        let header = serde_json::to_vec(&Header {
            dim: c.dim,
            metric: c.metric.name().into(),
            dtype: c.storage.name().into(),
            connectivity: c.connectivity,
            ef_construction: c.ef_construction,
            ef_search: c.ef_search,
            exact_below: c.exact_below,
            count: engine.size(),
        })
        .expect("header serialises");
        drop(engine);
        let mut bytes = Vec::with_capacity(FIXED + header.len() + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());

        let tmp = path.with_extension("tmp-write");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }

    /// Reads an index written by [`AnnIndex::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::format(path, reason);
        if bytes.len() < FIXED {
            return Err(bad(format!(
                "file is {} bytes, too short to be a tiergate index (truncated?)",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a tiergate ANN index (wrong magic bytes)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version} is not supported (this tiergate reads version {FORMAT_VERSION})"
            )));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
        let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        let payload_at = 16usize
            .checked_add(header_len)
            .and_then(|x| x.checked_add(8))
            .filter(|&x| x <= body.len())
            .ok_or_else(|| {
                bad("header length points past the end of the file (truncated?)".into())
            })?;
        let payload_len = u64::from_le_bytes(
            bytes[payload_at - 8..payload_at]
                .try_into()
                .expect("8 bytes"),
        );
        if payload_at as u64 + payload_len != body.len() as u64 {
            return Err(bad(format!(
                "payload should be {payload_len} bytes but the file holds {} (truncated or padded)",
                body.len() - payload_at
            )));
        }
        if crc32fast::hash(body) != stored {
            return Err(bad("checksum mismatch: the file is corrupt".into()));
        }
        let header: Header = serde_json::from_slice(&bytes[16..16 + header_len])
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
        let index = AnnIndex::new(config).map_err(|e| bad(e.to_string()))?;
        {
            let engine = index.engine.write();
            engine
                .load_from_buffer(&body[payload_at..])
                .map_err(|e| bad(format!("the engine could not read the payload: {e}")))?;
            if engine.size() != header.count || engine.dimensions() != header.dim {
                return Err(bad(format!(
                    "payload holds {} entries of dim {}, header says {} of dim {}",
                    engine.size(),
                    engine.dimensions(),
                    header.count,
                    header.dim
                )));
            }
            // Loading replaces the engine's settings with the saved ones, ef included.
            engine.change_expansion_search(header.ef_search);
        }
        // The flat copy is not saved; small loaded indexes search exactly
        // through the engine instead.
        *index.flat.write() = None;
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
        // Before saving, a small index searches its flat copy; after loading,
        // the engine's exact search: the same neighbours, scores to rounding.
        let (a, b) = (
            back.search(&q, 3, None).unwrap(),
            idx.search(&q, 3, None).unwrap(),
        );
        assert_eq!(a.ids, b.ids);
        for (x, y) in a.scores.iter().zip(&b.scores) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
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
