//! Shared pieces of Tern's demo chain (`pay`, `order`, `loadgen`): gRPC status-code names,
//! deadline handling, the latency histogram, flag parsers, order's HTTP/JSON API types,
//! loadgen's counters, process plumbing (signals, logging) and the servers' accept side.

pub mod cli;
pub mod codes;
pub mod deadline;
pub mod histogram;
pub mod net;
pub mod order_api;
pub mod process;
pub mod stats;
pub mod trailers;
