//! The identity provider (Microsoft Entra ID in any of its clouds, or any
//! OpenID provider): discovery, the signing keys, ID and access token
//! verification, the app's own credential, and the explanations of
//! Entra's sign-in errors.

pub(crate) mod cloud;
pub(crate) mod credential;
pub(crate) mod explain;
pub(crate) mod graph;
pub(crate) mod jwks;
pub(crate) mod provider;
mod settings;
pub(crate) mod token;

pub use provider::Oidc;
pub use settings::{ClientAuth, GroupsOverage, OidcConfig, ResponseMode};
