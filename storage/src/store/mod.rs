//! The model store (being written).
