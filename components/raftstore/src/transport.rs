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
    /// raft-rs's message; a default one (never stepped) when `extra` is set.
    pub msg: Message,
    pub extra: Option<Extra>,
}

/// Messages between Flotilla nodes that raft-rs does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extra {
    /// To a shard's leader from a follower woken by something other than
    /// the leader: tick again (`replica::fsm::hibernate`).
    WakeUp,
    /// Node liveness, sent every raft heartbeat interval to every peer node
    /// (`crate::liveness`);
    /// `incarnation` changes when the sending process restarts.
    NodeHeartbeat { incarnation: u64 },
    /// Leader to follower: the leader has nothing to do and will sleep once
    /// every replica agreed; a follower whose log ends at `index` in `term`
    /// with `commit` committed sleeps and answers `HibernateAck`.
    Hibernate { term: u64, index: u64, commit: u64 },
    /// Follower to leader: asleep, as the leader of `term` asked.
    HibernateAck { term: u64 },
}

impl RaftMessage {
    /// A node heartbeat from `from_node` to `to_node`.
    pub fn node_heartbeat(from_node: NodeId, to_node: NodeId, incarnation: u64) -> Self {
        RaftMessage {
            shard_id: 0,
            from_node,
            to_node,
            from_replica: 0,
            to_replica: 0,
            epoch: Epoch::default(),
            msg: Message::default(),
            extra: Some(Extra::NodeHeartbeat { incarnation }),
        }
    }
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
