//! strata-daemon: `stratad`, strata's service over a Unix socket.
//!
//! - [`server`] holds the axum router: OpenAI-compatible `/v1` routes, native `/api` routes
//!   and `/metrics`; [`api`] checks request bodies into typed [`api::GenParams`].
//! - [`manager::Manager`] loads models by store name, unloads them after the keep-alive (not
//!   the ones named at start), and gives each one an engine thread ([`worker`]) that owns every sequence's state and is
//!   reached only through a bounded queue of typed requests.
//! - [`listen`] binds (or inherits, under socket activation) the sockets and runs the accept
//!   loops with read timeouts; [`conns`] caps the open connections, per peer and in all; [`notify`] speaks systemd's readiness protocol and [`watchdog`] feeds systemd's
//!   watchdog from the engine loops; [`shutdown`] is the drain state.
//! - [`config`] merges defaults, `/etc/strata/strata.toml`, `STRATA_*` variables and flags;
//!   [`pull`] serves `/api/pull`; [`logprobs`] computes OpenAI's token log-probabilities.
//! - [`sessions`] checks a request's `session` and reads the saved KV cache it resumes from;
//!   the engine thread saves it after the answer.
//!
//! The API is documented in `daemon/API.md`.

pub mod api;
pub mod config;
pub mod conns;
pub mod error;
pub mod listen;
pub mod logprobs;
pub mod manager;
pub mod metrics;
pub mod notify;
pub mod pull;
pub mod server;
pub mod sessions;
pub mod shutdown;
pub mod stop;
pub mod watchdog;
pub mod worker;
