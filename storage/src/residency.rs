//! Residency (being written).
