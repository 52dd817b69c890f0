//! The orders example's function under `cargo lambda watch` (added below).
