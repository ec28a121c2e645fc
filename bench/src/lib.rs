//! Benchmark helpers (scripts live in bench/).
