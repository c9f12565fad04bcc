//! Any bytes as an ANN index file: an error or an index that answers, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tiergate_core::ann::AnnIndex;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = AnnIndex::load_bytes(data.to_vec()) {
        let query = vec![0.5f32; index.dim()];
        let _ = index.search(&query, 3, None);
    }
});
