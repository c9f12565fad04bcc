//! The hashed linear classifier: calibrated softmax over hashed features, fused with hashing for raw texts.
