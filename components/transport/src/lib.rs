//! The node-to-node Raft transport over gRPC.
//!
//! # Sending ([`RaftClient`])
//!
//! ```text
//! raft poller ──send(msg)──► pending[to_node]   (a Vec per peer, under a mutex)
//!             ──flush()────► one Vec per peer ──► peer task queue (bounded)
//!                                                  │ coalesce everything queued
//!                                                  ▼
//!                             one long-lived client-streaming `Raft` call per peer,
//!                             one RaftBatch per coalesced group
//! ```
//!
//! A peer task connects lazily, reconnects with exponential backoff (100 ms
//! to 5 s, cut short when the peer opens a stream to this node: it is up
//! then, see [`RaftClient::peer_is_up`]), and while the peer cannot be
//! reached drops what is queued for it
//! and tells each sending replica (`report_unreachable`), which makes the
//! leader probe that follower again instead of streaming appends into the
//! void. Nothing here blocks a poller: a full peer queue drops the batch
//! (Raft retransmits).
//!
//! # Receiving ([`RaftService`])
//!
//! Each incoming stream is read batch by batch; every envelope's payload is
//! decoded as a raft-rs message (rust-protobuf; peers only, see
//! RUSTSEC-2024-0437 in the README) and handed to the store router, which
//! never blocks either.
//!
//! # Test filters
//!
//! [`RaftClient::add_filter`] installs [`Filter`]s that drop or delay
//! messages by sender, receiver, shard or type. In-process cluster tests use
//! them to cut links and build partitions over the real gRPC transport.
//!
//! # Snapshots
//!
//! MsgSnapshot travels with its file on a separate `Snapshot` call per
//! snapshot (see `snapshot`), limited in number and rate.
//!
//! # Not done
//! - TLS between peers.

mod client;
mod extra;
mod filter;
mod service;
mod snapshot;

pub use client::{AddressBook, RaftClient, RaftClientConfig};
pub use filter::{Filter, FilterDecision, PartitionFilter};
pub use service::RaftService;
pub use snapshot::SnapshotConfig;

pub mod metrics;
