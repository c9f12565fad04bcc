//! Any bytes as a semantic-cache snapshot: an error that restores nothing, or a
//! cache that answers, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tiergate_core::ann::Metric;
use tiergate_core::cache::{CacheConfig, SemanticCache};

fuzz_target!(|data: &[u8]| {
    let config = CacheConfig {
        dim: 4,
        metric: Metric::Cosine,
        threshold: 0.9,
        ttl_seconds: Some(3600.0),
        capacity: 64,
    };
    let cache = SemanticCache::new(config).expect("valid config");
    match cache.restore_bytes(data.to_vec(), 1_000.0) {
        Ok(n) => {
            assert_eq!(cache.len(), n);
            for ns in cache.namespaces() {
                let _ = cache.get(&ns, &[1.0, 0.0, 0.0, 0.0]);
            }
        }
        Err(_) => assert!(cache.is_empty(), "a failed restore must add nothing"),
    }
});
