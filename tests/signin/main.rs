//! Sign-in end to end: the real binary with real TLS, a real OpenID
//! provider process shaped like Entra (npm `oidc-provider`), a real
//! upstream, and a real headless Chromium clicking through the login.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod assertion;
mod boundary;
mod browser;
mod clouds;
mod credentials;
mod easy_auth;
mod egress;
mod front;
mod operations;
mod overage;
mod replicas;
mod sessions;
mod step_up;
