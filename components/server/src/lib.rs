//! A Flotilla node: configuration, bootstrap, the gRPC services (Kv, Admin,
//! Raft) and the status HTTP server, around the raftstore.
//!
//! ```text
//! client ──gRPC──► KvService ──validate limits──► StoreRouter ──► replica
//!                  AdminService ──► Directory (routes) + StoreMeta (leaders)
//! peers  ──gRPC──► RaftService ──► StoreRouter
//! ops    ──HTTP──► /health /ready /metrics /status
//! ```
//!
//! `Server::start` is the one way a node starts (the binary and the
//! in-process test cluster both use it); `Server::shutdown` the one way it
//! stops.

pub mod admin_service;
pub mod cluster_meta;
pub mod config;
pub mod directory;
pub mod kv_service;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod service;
pub mod status;

pub use config::Config;
pub use node::{Listeners, Server};
