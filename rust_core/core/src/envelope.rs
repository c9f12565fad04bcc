//! The envelope every tiergate binary file shares (ANN indexes, cache snapshots):
//!
//! ```text
//! magic        8 bytes  names the kind of file
//! version      u32 LE   the format version of that kind
//! header_len   u32 LE
//! header       JSON     settings and counts
//! payload_len  u64 LE
//! payload      bytes    the kind's own layout
//! crc32        u32 LE   over every byte above
//! ```
//!
//! Writing is atomic (a temporary file, fsync, then rename), so a crash mid-write
//! leaves the previous file whole. Reading checks size, magic, version, lengths and
//! checksum before anyone looks at the payload. (The checksum guards against
//! accidents, not against a forger: the payload readers still check every value.)

use std::io::Write;
use std::ops::Range;
use std::path::Path;

use crate::{Error, Result};

const FIXED: usize = 8 + 4 + 4 + 8 + 4;

/// One kind of file: how it is recognised and described in errors.
pub struct Kind {
    pub magic: &'static [u8; 8],
    pub version: u32,
    /// "a tiergate ANN index": what the file should have been.
    pub what: &'static str,
    /// What to do about a file of another version.
    pub on_old_version: &'static str,
}

/// A file that passed the envelope's checks.
pub struct Opened {
    bytes: Vec<u8>,
    header: Range<usize>,
    payload: Range<usize>,
}

impl Opened {
    pub fn header(&self) -> &[u8] {
        &self.bytes[self.header.clone()]
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.payload.clone()]
    }
}

/// Writes `header` and `payload` to `path` in the envelope of `kind`, atomically.
pub fn write(path: &Path, kind: &Kind, header: &[u8], payload: &[u8]) -> Result<()> {
    let mut bytes = Vec::with_capacity(FIXED + header.len() + payload.len());
    bytes.extend_from_slice(kind.magic);
    bytes.extend_from_slice(&kind.version.to_le_bytes());
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
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

/// Reads `path` and checks its envelope against `kind`.
pub fn read(path: &Path, kind: &Kind) -> Result<Opened> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    open(bytes, path, kind)
}

/// Checks the envelope of `bytes` against `kind`; errors name `path`.
pub fn open(bytes: Vec<u8>, path: &Path, kind: &Kind) -> Result<Opened> {
    let bad = |reason: String| Error::format(path, reason);
    if bytes.len() < FIXED {
        return Err(bad(format!(
            "file is {} bytes, too short to be {} (truncated?)",
            bytes.len(),
            kind.what
        )));
    }
    if &bytes[..8] != kind.magic {
        return Err(bad(format!("not {} (wrong magic bytes)", kind.what)));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != kind.version {
        return Err(bad(format!(
            "format version {version} is not supported (this tiergate reads version {}; {})",
            kind.version, kind.on_old_version
        )));
    }
    let body_len = bytes.len() - 4;
    let stored = u32::from_le_bytes(bytes[body_len..].try_into().expect("4 bytes"));
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    let payload_at = 16usize
        .checked_add(header_len)
        .and_then(|x| x.checked_add(8))
        .filter(|&x| x <= body_len)
        .ok_or_else(|| bad("header length points past the end of the file (truncated?)".into()))?;
    let payload_len = u64::from_le_bytes(
        bytes[payload_at - 8..payload_at]
            .try_into()
            .expect("8 bytes"),
    );
    if (payload_at as u64).checked_add(payload_len) != Some(body_len as u64) {
        return Err(bad(format!(
            "payload should be {payload_len} bytes but the file holds {} (truncated or padded)",
            body_len - payload_at
        )));
    }
    if crc32fast::hash(&bytes[..body_len]) != stored {
        return Err(bad("checksum mismatch: the file is corrupt".into()));
    }
    Ok(Opened {
        header: 16..16 + header_len,
        payload: payload_at..body_len,
        bytes,
    })
}

/// Little-endian reads from a payload, each failing with a message instead of
/// panicking when the payload ends early.
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    pub fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err("payload ends in the middle of an entry (corrupt)".into());
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    pub fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    pub fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    pub fn f32(&mut self) -> std::result::Result<f32, String> {
        Ok(f32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    pub fn f64(&mut self) -> std::result::Result<f64, String> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

/// Seeded mutation fuzzing for the readers of every kind of file.
#[cfg(test)]
pub mod testing {
    /// `n` mutants of the valid file `good`: flipped, cut, inserted and
    /// overwritten bytes. The checksum is recomputed, and half the time the
    /// payload length too, so that mutants get past the envelope and meet the
    /// payload reader's own checks.
    pub fn mutants(good: &[u8], n: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        (0..n).map(move |_| {
            let mut m = good[..good.len() - 4].to_vec();
            match next() % 4 {
                0 => {
                    let at = (next() as usize) % m.len();
                    m[at] ^= 1 << (next() % 8);
                }
                1 => m.truncate((next() as usize) % m.len()),
                2 => {
                    let at = (next() as usize) % m.len();
                    m.insert(at, next() as u8);
                }
                _ => {
                    let at = (next() as usize) % (m.len() - 8);
                    m[at..at + 8].copy_from_slice(&next().to_le_bytes());
                }
            }
            if m.len() > 24 && next() % 2 == 0 {
                let header_len = u32::from_le_bytes(m[12..16].try_into().expect("4")) as usize;
                let at = 16 + header_len;
                if at + 8 <= m.len() {
                    let len = (m.len() - at - 8) as u64;
                    m[at..at + 8].copy_from_slice(&len.to_le_bytes());
                }
            }
            let crc = crc32fast::hash(&m);
            m.extend_from_slice(&crc.to_le_bytes());
            m
        })
    }
}
