//! `flotilla-client`: an async Rust client that routes every request to the
//! leader of the shard owning its key.
//!
//! # How a request travels
//!
//! 1. The route cache (shards ordered by start key, each with the leader's
//!    node when known) names the shard of the key; on a miss the client asks
//!    any node (`Admin.GetRoute`, or `ListShards` to fill the cache).
//! 2. The request goes to the cached leader's node (or a replica's, when no
//!    leader is known) with the shard's id and epoch, over the client's one
//!    `BatchCommands` stream to that node (requests queued together share a
//!    message; see the `conn` module) or, for batch gets, scans and with
//!    `ClientConfig::batch_commands = false`, as a unary RPC.
//! 3. On a routing error the cache is fixed and the request retried with
//!    exponential backoff (2 ms doubling to 500 ms, jittered) within the
//!    request's total deadline: `NotLeader` updates the leader (the retry is
//!    immediate when a new leader is named), `EpochNotMatch` installs the
//!    new descriptors, `ShardNotFound`/`KeyNotInShard` drop the cached route,
//!    `ServerIsBusy` and transport errors back off and try another replica.
//!    While replicas know no leader (an election), and after a node refused
//!    a connection or its stream broke before the request left (the node
//!    is gone), the back-off stays under `ClientConfig::election_backoff_max`
//!    (100 ms), and a node that refused is passed over for
//!    `ClientConfig::unreachable_for` (1 s). With
//!    `RUST_LOG=flotilla_client=debug` every retry is logged with its reason.
//! 4. `StaleCommand` (definitely not applied) is retried. A write whose
//!    outcome is unknown (`Indeterminate` from the server, no answer before
//!    the deadline, a connection lost after the request went out) is
//!    returned as `Error::Indeterminate`, never sent again: a blind retry of
//!    even a put can land after a newer write to the same key and bring the
//!    old value back. The caller decides (read, then write again).
//!
//! Reads follow the client's [`ReadMode`] (`Client::with_read_mode`): the
//! leader by default (served from its lease when it holds one), or any
//! replica for follower and stale reads, starting from a random one and
//! moving to the next when one cannot serve.
//!
//! Batch requests are split by shard and sent in parallel; a scan crossing
//! shards is stitched into one ordered result.
//!
//! Operator calls (membership changes, leadership transfer) go to the
//! shard's leader the same way; see the `admin` module.

mod admin;
mod client;
mod conn;
mod error;
mod routes;

pub use client::{CasResult, Client, ClientConfig, KvPair, NodeStatus, ShardInfo};
pub use error::{Error, Result};
pub use flotilla_proto::kv::ReadMode;
