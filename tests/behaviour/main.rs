//! Behaviour suite (being written).
