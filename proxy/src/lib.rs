//! tern-proxy: the Tern sidecar.
//!
//! One HTTP request path ([`stack::http`]) serves both directions: inbound
//! (mesh → local app) and outbound (local app → mesh). Connection handling
//! lives in [`serve`]; what a request passes through, in order, in [`stack`].

pub mod access_log;
pub mod accrual;
pub mod admin;
pub mod app;
pub mod authz;
pub mod balance;
pub mod body;
pub mod config;
pub mod control;
pub mod discovery;
pub mod endpoint;
pub mod errors;
pub mod explain;
pub mod identity;
pub mod inbound;
pub mod intercept;
pub mod limits;
pub mod metrics;
pub mod observe;
pub mod on_demand;
pub mod outbound;
pub mod retry;
pub mod router;
pub mod routes;
pub mod serve;
pub mod stack;
pub mod tap;
pub mod targets;
pub mod tcp;
pub mod telemetry;
pub mod trace_context;
pub mod warn_limit;
