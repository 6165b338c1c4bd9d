//! The boundary between the raftstore and the network.
//!
//! The raft pollers hand every outgoing message to a [`Transport`] during the
//! round and call [`Transport::flush`] once at its end; an implementation
//! batches messages per destination node and sends a batch per flush. It
//! never blocks the poller. Messages it cannot deliver are dropped (Raft
//! retries), and it tells the sender's replica with
//! [`crate::StoreRouter::report_unreachable`].

use flotilla_proto::meta::Epoch;
use raft::eraftpb::Message;

use crate::{NodeId, ReplicaId, ShardId};

/// A raft-rs message with the routing fields of its envelope.
#[derive(Clone, Debug)]
pub struct RaftMessage {
    pub shard_id: ShardId,
    pub from_node: NodeId,
    pub to_node: NodeId,
    pub from_replica: ReplicaId,
    pub to_replica: ReplicaId,
    /// The sender's descriptor epoch.
    pub epoch: Epoch,
    pub msg: Message,
}

/// Sends raft messages to other nodes.
pub trait Transport: Send + Sync + 'static {
    /// Queues a message; must not block.
    fn send(&self, msg: RaftMessage);
    /// Sends everything queued since the last flush.
    fn flush(&self);
    /// Sends a MsgSnapshot with its snapshot file, apart from other traffic.
    /// The outcome is reported to the sending replica
    /// (`StoreRouter::report_snapshot`).
    fn send_snapshot(&self, msg: RaftMessage);
}
