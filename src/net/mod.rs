//! The network edge: listening sockets and their worker threads, TLS and
//! its certificate reload, certificates from an ACME CA, hyper's server
//! settings, and the plain-HTTP listeners (the port-80 redirect, which
//! also answers ACME's HTTP-01, and the admin listener). Everything a
//! request meets before [`crate::pipeline`] sees it.

pub mod acme;
mod deadline;
mod http;
mod listener;
mod plain;
mod settings;
pub mod tls;

pub use http::http_builder;
pub use listener::{bind_workers, OpenConnections, TlsListener, Workers};
pub use plain::{redirect, run_plain};
pub use settings::{Limits, Timeouts};
