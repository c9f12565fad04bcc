//! Approximate nearest-neighbour index (HNSW, plus exact search for small sets) with a versioned, checksummed file format.
