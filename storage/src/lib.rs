//! strata-storage: everything about bytes.
//!
//! - [`gguf`] parses GGUF files as hostile input: [`gguf::GgufFile`] holds the metadata and the
//!   tensor table, validated before anything is allocated.
//! - [`quant`] names the element types ([`quant::GgmlType`]), their block layouts and the scalar
//!   dequantization every faster kernel is tested against.
//! - [`residency`] is the only way model code reaches weight bytes: it asks for a tensor and gets
//!   a [`residency::TensorHandle`] that says where the bytes live and keeps them there while held.
//! - [`io`] reads byte ranges of a file with io_uring (`O_DIRECT`, many reads in flight) or a
//!   pread pool, behind a seam for injected faults.
//! - [`session`] saves a KV cache and its tokens crash-safely, with a checksum per chunk, and
//!   validates a saved one completely before anything uses it.
//! - [`store`] is the model store: pull (PyPI, HTTPS, local path) with SHA-256 verification,
//!   list, remove, resolve a name to a file.
//! - [`text::clip`] shortens and escapes untrusted text before a message quotes it;
//!   [`trust::check_socket_dir`] is the check the daemon and its client make of a socket's
//!   directory.
//!
//! This crate knows nothing about models, tokio or the daemon's HTTP.

pub mod buf;
pub mod gguf;
pub mod io;
pub mod quant;
pub mod residency;
pub mod session;
pub mod store;
pub mod text;
pub mod trust;
