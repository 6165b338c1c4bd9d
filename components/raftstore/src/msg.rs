//! Messages between the server, the raft pollers and the apply pollers.
//!
//! Requests from clients carry a callback, a boxed closure called exactly
//! once with the outcome. If the message is dropped instead (the node shuts
//! down), the closure is dropped uncalled; callers wrap a oneshot channel and
//! treat a cancelled channel as "node shutting down, outcome unknown".

use std::time::Instant;

use bytes::Bytes;
pub use flotilla_proto::kv::ReadMode;
use flotilla_proto::local::{ApplyState, SnapshotData};
use flotilla_proto::meta::{Epoch, ShardDescriptor};
use flotilla_proto::raftcmd::{op, WriteCommand};
use flotilla_storage::replica_storage::GeneratedSnapshot;
use raft::eraftpb::{ConfChangeV2, Entry};
use raft::StateRole;

use crate::transport::RaftMessage;
use crate::{Index, NodeId, ReplicaId, Result, ShardId, Term};

/// A callback, called exactly once (or dropped uncalled at shutdown).
pub type Callback<T> = Box<dyn FnOnce(T) + Send>;

/// Outcome of one CompareAndSwap op.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CasOutcome {
    pub succeeded: bool,
    /// The key's value before the op, if it existed.
    pub previous: Option<Bytes>,
}

/// Outcome of one write command: one entry per CAS op, in op order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteResult {
    pub cas: Vec<CasOutcome>,
}

pub type WriteCallback = Callback<Result<WriteResult>>;
/// Called with `Ok(())` once a read may run against the local RocksDB and be
/// linearizable: the replica is the leader and has applied at least the
/// read index obtained after the read arrived.
pub type ReadCallback = Callback<Result<()>>;

/// A write for one shard.
pub struct WriteRequest {
    pub shard_id: ShardId,
    pub epoch: Epoch,
    pub command: WriteCommand,
    pub cb: WriteCallback,
}

/// The keys a request touches, checked against the shard's range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySpan {
    Point(Bytes),
    /// `[start, end)`; an empty `end` means the end of the shard.
    Range {
        start: Bytes,
        end: Bytes,
    },
}

impl KeySpan {
    /// The first key the span touches.
    pub fn first_key(&self) -> &Bytes {
        match self {
            KeySpan::Point(k) => k,
            KeySpan::Range { start, .. } => start,
        }
    }

    /// The key that lies outside `shard`, if any.
    pub fn outside<'a>(&'a self, shard: &ShardDescriptor) -> Option<&'a [u8]> {
        match self {
            KeySpan::Point(k) => (!shard.contains(k)).then_some(&k[..]),
            KeySpan::Range { start, end } => {
                if !shard.contains(start) {
                    return Some(start);
                }
                let end_ok =
                    end.is_empty() || shard.end_key.is_empty() || end[..] <= shard.end_key[..];
                (!end_ok).then_some(&end[..])
            }
        }
    }
}

/// The key spans touched by a write command.
pub fn write_spans(cmd: &WriteCommand) -> impl Iterator<Item = KeySpan> + '_ {
    cmd.ops.iter().filter_map(|o| {
        Some(match o.op.as_ref()? {
            op::Op::Put(p) => KeySpan::Point(p.key.clone()),
            op::Op::Delete(d) => KeySpan::Point(d.key.clone()),
            op::Op::Cas(c) => KeySpan::Point(c.key.clone()),
            op::Op::DeleteRange(r) => KeySpan::Range {
                start: r.start_key.clone(),
                end: r.end_key.clone(),
            },
        })
    })
}

/// A read of one shard: `cb` is answered once the replica may serve it
/// from its applied state under `mode` (see `replica::read`).
pub struct ReadRequest {
    pub shard_id: ShardId,
    pub epoch: Epoch,
    pub spans: Vec<KeySpan>,
    pub mode: ReadMode,
    pub cb: ReadCallback,
}

/// What an applied admin command reports.
#[derive(Clone, Debug, Default)]
pub struct AdminResult {
    /// The log index of the command (for a log compaction that had nothing
    /// to do: the index the log is already truncated at).
    pub index: Index,
    /// The shard's descriptor after the command.
    pub shard: ShardDescriptor,
}

/// Called once an admin command applied (or failed).
pub type AdminCallback = Callback<Result<AdminResult>>;

/// Who waits for a proposed entry.
pub enum ProposalCallbacks {
    /// Client writes batched into the entry, in command order.
    Writes(Vec<WriteCallback>),
    /// An admin command (no callback when proposed by the replica itself).
    Admin(Option<AdminCallback>),
}

impl ProposalCallbacks {
    pub fn len(&self) -> usize {
        match self {
            ProposalCallbacks::Writes(v) => v.len(),
            ProposalCallbacks::Admin(cb) => usize::from(cb.is_some()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Answers every waiter with an error made by `err`.
    pub fn fail(self, err: impl Fn() -> crate::Error) {
        match self {
            ProposalCallbacks::Writes(v) => {
                for cb in v {
                    cb(Err(err()));
                }
            }
            ProposalCallbacks::Admin(Some(cb)) => cb(Err(err())),
            ProposalCallbacks::Admin(None) => {}
        }
    }
}

/// A proposed log entry and whoever waits for it.
pub struct Proposal {
    pub index: Index,
    pub term: Term,
    pub callbacks: ProposalCallbacks,
    pub proposed_at: Instant,
}

/// Committed entries for the apply poller, with the proposals they may
/// answer (those with index <= the last entry's index).
pub struct ApplyTask {
    pub entries: Vec<Entry>,
    pub proposals: Vec<Proposal>,
    /// When the raft poller handed the entries over.
    pub sent_at: Instant,
}

/// A received snapshot to install: its data replaces the shard's range.
pub struct SnapshotInstall {
    pub index: Index,
    pub term: Term,
    pub data: SnapshotData,
}

pub enum ApplyMsg {
    Apply(ApplyTask),
    /// Build a snapshot of what is applied so far.
    GenerateSnapshot,
    Install(SnapshotInstall),
}

/// Effects of admin commands and snapshots the replica FSM must follow.
#[derive(Clone, Debug)]
pub enum ExecResult {
    /// The log was truncated up to this index (inclusive).
    CompactLog { index: Index },
    /// A received snapshot is now the shard's state.
    SnapshotInstalled {
        index: Index,
        term: Term,
        shard: ShardDescriptor,
    },
    /// A membership change applied; `shard` is the new descriptor.
    ConfChange {
        cc: ConfChangeV2,
        shard: ShardDescriptor,
    },
    /// The shard was split: it is now `left`; `right` is the new shard.
    /// `right_replica` is this node's replica of it, unless that replica
    /// was already removed from this node (then it is not created).
    Split {
        left: ShardDescriptor,
        right: ShardDescriptor,
        right_replica: Option<ReplicaId>,
    },
}

/// What the apply poller reports back to the replica after a round.
#[derive(Clone, Debug)]
pub struct ApplyResult {
    pub apply_state: ApplyState,
    pub exec: Vec<ExecResult>,
    /// Bytes of keys and values written this round, and keys put: hints
    /// for the split check.
    pub written_bytes: u64,
    pub written_keys: u64,
}

/// A replica's view of itself, for status pages and ctl.
#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    pub shard: ShardDescriptor,
    pub replica_id: ReplicaId,
    pub role: StateRole,
    pub term: Term,
    pub leader_id: ReplicaId,
    pub commit_index: Index,
    pub applied_index: Index,
    pub last_index: Index,
    pub truncated_index: Index,
    pub pending_proposals: usize,
    /// Not ticking (`replica::fsm::hibernate`).
    pub hibernated: bool,
}

/// Messages to a replica FSM.
pub enum ReplicaMsg {
    /// A raft message from a peer.
    Raft(Box<RaftMessage>),
    Write(WriteRequest),
    Read(ReadRequest),
    /// One logical clock tick from the node's ticker.
    Tick,
    Applied(ApplyResult),
    /// The transport could not deliver to this peer.
    Unreachable {
        to_replica: ReplicaId,
    },
    Status(Callback<ReplicaStatus>),
    /// Starts a leadership transfer; answered at once (the transfer itself
    /// completes, or not, within an election timeout).
    TransferLeader {
        to_replica: ReplicaId,
        cb: Callback<Result<()>>,
    },
    /// A snapshot build finished (`None`: it failed).
    SnapshotGenerated(Option<Box<GeneratedSnapshot>>),
    /// A snapshot sent to `to_replica` arrived (`ok`) or not.
    SnapshotStatus {
        to_replica: ReplicaId,
        ok: bool,
    },
    /// Compact the log now (leader only); the callback gets the index.
    CompactLog(Option<AdminCallback>),
    /// Have every replica hash the shard (leader only).
    ComputeHash(AdminCallback),
    /// Change the shard's membership (leader only).
    ChangeReplicas {
        changes: Vec<flotilla_proto::admin::ReplicaChange>,
        cb: AdminCallback,
    },
    /// Split the shard at `key` (leader only); the new shard and its
    /// replicas take the given ids (allocated by the meta shard). The
    /// callback gets the left (this shard's) descriptor.
    Split {
        key: bytes::Bytes,
        new_shard_id: ShardId,
        new_replica_ids: Vec<ReplicaId>,
        cb: AdminCallback,
    },
    /// The shard's directory entry (from the meta shard) is newer than this
    /// replica's descriptor and leaves it out: it was removed while away.
    Tombstone(ShardDescriptor),
    /// To an uninitialized replica: a split on this node created the shard
    /// (its state is on disk); become that replica.
    InitBySplit(ShardDescriptor),
    /// Nothing to do but run a round (a ready was left over).
    Wake,
    /// A node holding a replica of this shard went silent, came back or
    /// restarted (`crate::liveness`).
    PeerNode {
        node: NodeId,
        event: crate::liveness::PeerEvent,
    },
}

/// Messages to the node's control FSM.
pub enum ControlMsg {
    /// A raft message for a shard this node does not host.
    UnknownShard(Box<RaftMessage>),
    /// Once per election timeout from the ticker: forget parked votes that
    /// waited too long.
    Tick,
    /// A split applied here created this replica of the shard `shard`
    /// (its shard and apply states are on disk).
    SplitCreated {
        shard: ShardDescriptor,
        replica_id: ReplicaId,
        /// The split shard's replica was leading: campaign at once.
        campaign: bool,
    },
}
