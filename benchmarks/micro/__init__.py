"""Micro-benchmarks of the Rust tiers, each next to the baseline a user would otherwise pick."""
