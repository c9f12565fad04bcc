//! The semantic cache: per-namespace ANN lookups with a similarity threshold, TTL and LRU capacity.
