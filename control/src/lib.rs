//! tern-control, the Tern control plane.
//!
//! It reads the mesh config from a directory of YAML documents ([`config`],
//! [`watch`]), keeps a registry of the workloads whose sidecars are
//! connected ([`registry`]), works out what each sidecar needs and which
//! sidecars a change affects ([`snapshot`], [`state`]), and pushes versioned
//! snapshots over the `tern.control.v1.ControlPlane/Subscribe` stream
//! ([`server`], [`session`], [`wire`]). [`admin`] serves `/metrics`, `/ready` and `/state`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod state;
pub mod watch;
pub mod wire;
