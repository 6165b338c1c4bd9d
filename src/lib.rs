//! The `flotilla` package: the three binaries (`flotilla-server`,
//! `flotilla-ctl`, `flotilla-bench`) and the end-to-end tests under `tests/`.
//! The engine itself lives in the crates under `components/`:
//!
//! | crate | job |
//! |---|---|
//! | `flotilla-batch-system` | FSMs on a fixed pool of poller threads |
//! | `flotilla-storage` | raft-engine and RocksDB, raft-rs `Storage` |
//! | `flotilla-raftstore` | replica and apply FSMs, poll rounds, bootstrap |
//! | `flotilla-transport` | node-to-node Raft messages over gRPC |
//! | `flotilla-server` | config, gRPC services, status HTTP, node assembly |
//! | `flotilla-client` | the routing, retrying async client |
//! | `flotilla-test-cluster` | in-process clusters for tests |
//! | `flotilla-proto` | wire and disk formats |
