//! No code. This crate's dependencies ask for the union of the features CI's cargo selections
//! enable on shared crates, so that every selection compiles those crates (and everything above
//! them) once. See its Cargo.toml for why, and `.ci/features` for the check that keeps it true.
