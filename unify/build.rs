//! Empty: it exists so that the build-dependencies in Cargo.toml (syn's features for the proc
//! macros) take part in the host's feature resolution. See Cargo.toml for why this crate exists.

fn main() {}
