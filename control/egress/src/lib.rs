//! The host side of a sandbox's egress: its `proxy_config` (the LangSmith SDK's) compiled into
//! a [`policy::Policy`], and the HTTP proxy that enforces it on every connection the guest
//! makes, adding the rules' credentials to intercepted HTTPS so that they never enter the
//! sandbox, and writing an [`audit`] event for each connection and request.
//!
//! - [`config`]: the `proxy_config` as the SDK sends it.
//! - [`pattern`]: host and path patterns; [`rules`]: header injection; [`policy`]: decisions.
//! - [`secrets`]: the host's secret store that rules' references resolve against.
//! - [`ca`]: the per-deployment CA whose leaves intercepted connections are served with.
//! - [`proxy`]: the proxy itself, on a Unix or TCP listener; `intercept` is its TLS
//!   interception, [`upstream`] its side towards destinations, `meter` its byte counts.
//! - [`audit`]: what the proxy records about each connection and request.

pub mod audit;
pub mod ca;
pub mod config;
mod intercept;
mod meter;
pub mod pattern;
pub mod policy;
pub mod proxy;
pub mod rules;
pub mod secrets;
pub mod upstream;
