//! Startup checks (being written).
