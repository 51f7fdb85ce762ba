//! tern-control, the Tern control plane.
//!
//! It reads the mesh config from a directory of YAML documents ([`config`],
//! [`watch`]), keeps a registry of the workloads whose sidecars are
//! connected ([`registry`]), works out what each sidecar needs and which
//! sidecars a change affects ([`snapshot`], [`state`]), and pushes versioned
//! snapshots over the `tern.control.v1.ControlPlane/Subscribe` stream
//! ([`server`], [`session`], [`messages`], [`wire`]). [`admin`] serves `/metrics`, `/ready` and `/state`.
//!
//! Identity: a CA ([`ca`]) signs the CSRs of workloads that prove who they
//! are with a bootstrap token ([`tokens`]) over the `tern.identity.v1.Identity`
//! service ([`identity`]). The gRPC listener ([`tls`]) serves TLS with the
//! control plane's own certificate beside plaintext, and a sidecar's client
//! certificate is what its subscription and registration are checked against
//! ([`admission`]).
//!
//! Discovery: with `--discovery kubernetes`, [`discovery`] also watches the
//! cluster's Services, EndpointSlices and Pods and lays them over the
//! directory's documents by name.
//!
//! Flags: [`cli`] checks them once into the settings each module takes, and
//! [`app`] wires the modules together; no module imports one that imports it
//! back (a test reads the sources to keep it so).
//!
//! Kubernetes: [`webhook`] serves the mutating admission webhook that injects
//! the sidecar into new Pods (`tern_inject`, as `ternctl inject` does).
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod app;
pub mod ca;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod files;
pub mod identity;
pub mod messages;
pub mod metrics;
#[cfg(test)]
mod module_graph;
pub mod registry;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod state;
pub mod tls;
pub mod tokens;
pub mod watch;
pub mod webhook;
pub mod wire;
