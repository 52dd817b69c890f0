//! Holds sourceflow's trybuild cases; see `tests/ui.rs`. Nothing to use here.
