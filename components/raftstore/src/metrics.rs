//! Raftstore metrics. Labels are bounded (never a shard id).

use std::sync::LazyLock;

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge,
};

fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.00005, 2.0, 20).unwrap()
}

pub static PROPOSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_raft_proposals_total",
        "Client commands handled by shard leaders, by outcome at proposal time.",
        &["outcome"]
    )
    .unwrap()
});

pub static PROPOSAL_ENTRIES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_raft_proposal_entries_total",
        "Log entries proposed for client commands (commands are batched per round)."
    )
    .unwrap()
});

pub static PROPOSALS_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_raft_proposals_dropped_total",
        "Requests answered without their command applying (each waiter of a batched proposal counts), by reason: stale (its entry was replaced; not applied) or indeterminate (outcome unknown).",
        &["reason"]
    )
    .unwrap()
});

pub static COMMIT_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_raft_propose_to_commit_seconds",
        "From proposal to the entry being handed to apply.",
        latency_buckets()
    )
    .unwrap()
});

pub static APPLY_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_raft_propose_to_apply_seconds",
        "From proposal to the command's result being answered.",
        latency_buckets()
    )
    .unwrap()
});

pub static APPLY_WAIT: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_apply_wait_seconds",
        "Time committed entries wait for an apply poller.",
        latency_buckets()
    )
    .unwrap()
});

pub static APPLY_ROUND_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_apply_round_duration_seconds",
        "Duration of one apply poll round, RocksDB write included.",
        latency_buckets()
    )
    .unwrap()
});

pub static APPLIED_ENTRIES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_apply_entries_total",
        "Log entries applied to RocksDB."
    )
    .unwrap()
});

pub static POLL_ROUND_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "flotilla_poll_round_duration_seconds",
        "Duration of one poll round.",
        &["pool"],
        latency_buckets()
    )
    .unwrap()
});

pub static POLL_ROUND_FSMS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "flotilla_poll_round_fsms",
        "FSMs handled in one poll round.",
        &["pool"],
        prometheus::exponential_buckets(1.0, 2.0, 10).unwrap()
    )
    .unwrap()
});

pub static POLL_ROUND_READIES: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_poll_round_readies",
        "Replicas with a Raft ready in one raft poll round (they share one log write).",
        prometheus::exponential_buckets(1.0, 2.0, 10).unwrap()
    )
    .unwrap()
});

pub static READ_INDEX_REQUESTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_raft_read_index_requests_total",
        "ReadIndex requests issued (one per shard per round, covering many reads)."
    )
    .unwrap()
});

pub static READS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_raft_reads_total",
        "Linearizable reads, by outcome.",
        &["outcome"]
    )
    .unwrap()
});

pub static READ_PATHS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_raft_read_paths_total",
        "Reads accepted by a replica, by how they are served: lease (the leader's lease, no network round), read_index (the leader confirms with a quorum), follower (a follower asks the leader), stale (local applied state).",
        &["path"]
    )
    .unwrap()
});

pub static LEASE_RENEWALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_raft_lease_renewals_total",
        "Leader lease extensions, by the kind of quorum-acknowledged round: read_index or commit.",
        &["by"]
    )
    .unwrap()
});

pub static RAFT_MESSAGES_RECEIVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_raft_messages_received_total",
        "Raft messages stepped into replicas, by outcome.",
        &["outcome"]
    )
    .unwrap()
});

pub static LEADER_CHANGES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_raft_leader_changes_total",
        "Times a local replica became or stopped being leader."
    )
    .unwrap()
});

pub static SHARDS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("flotilla_shards", "Shard replicas hosted on this node.").unwrap()
});

pub static LEADERS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("flotilla_leaders", "Shard replicas on this node that lead.").unwrap()
});

pub static PENDING_PROPOSALS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "flotilla_raft_pending_proposals",
        "Proposed entries waiting for commit on this node."
    )
    .unwrap()
});

pub static SNAPSHOTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_snapshots_total",
        "Snapshot events: generated, sent, send_failed, received, applied, generate_failed.",
        &["event"]
    )
    .unwrap()
});

pub static SNAPSHOT_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "flotilla_snapshot_duration_seconds",
        "Duration of snapshot phases: generate, send, receive, apply.",
        &["phase"],
        prometheus::exponential_buckets(0.001, 2.0, 18).unwrap()
    )
    .unwrap()
});

pub static SNAPSHOT_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_snapshot_bytes_total",
        "Snapshot file bytes sent and received.",
        &["direction"]
    )
    .unwrap()
});

pub static LOG_COMPACTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_raft_log_compactions_total",
        "Shard logs truncated in raft-engine."
    )
    .unwrap()
});

pub static RAFT_ENGINE_PURGES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_raft_engine_purges_total",
        "raft-engine purge passes."
    )
    .unwrap()
});

pub static RAFT_ENGINE_PURGE_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_raft_engine_purge_duration_seconds",
        "Duration of one raft-engine purge pass.",
        prometheus::exponential_buckets(0.0001, 2.0, 18).unwrap()
    )
    .unwrap()
});

pub static SHARDS_WITHOUT_LEADER: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "flotilla_shards_without_leader",
        "Shard replicas on this node that know no leader."
    )
    .unwrap()
});

pub static REPLICAS_DOWN: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "flotilla_replicas_down",
        "Replicas that shards led from this node have not heard from within two election timeouts."
    )
    .unwrap()
});

pub static LEADER_TRANSFERS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_raft_leader_transfers_total",
        "Leadership transfers started by local leaders."
    )
    .unwrap()
});

pub static REPLICAS_HIBERNATED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "flotilla_replicas_hibernated",
        "Shard replicas on this node that stopped ticking because their shard is idle."
    )
    .unwrap()
});

pub static HIBERNATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_hibernations_total",
        "Replicas that stopped ticking, by role.",
        &["role"]
    )
    .unwrap()
});

pub static HIBERNATE_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_hibernate_requests_total",
        "Leaders' requests to their followers to hibernate, by outcome: granted (every replica agreed, the shard sleeps) or given_up (one did not answer in time, or the shard got busy).",
        &["outcome"]
    )
    .unwrap()
});

pub static WAKEUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_hibernation_wakeups_total",
        "Hibernated replicas that started ticking again, by cause.",
        &["reason"]
    )
    .unwrap()
});

pub static LIVENESS_STALLS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_liveness_stalls_total",
        "Times this node's peer liveness check ran an election timeout late (the node itself stood still); the stall is not counted as peer silence.",
    )
    .unwrap()
});

pub static PEER_NODE_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_peer_node_events_total",
        "Peer nodes this node found silent for an election timeout, heard again, or restarted.",
        &["event"]
    )
    .unwrap()
});

pub static PEER_NODES_DOWN: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "flotilla_peer_nodes_down",
        "Peer nodes this node has not heard from within an election timeout."
    )
    .unwrap()
});

pub static SPLIT_CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_split_checks_total",
        "Split checks of led shards, by result (split: past a size or key threshold, split_load: past the QPS threshold, below, failed).",
        &["result"]
    )
    .unwrap()
});

pub static SPLIT_CHECK_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_split_check_duration_seconds",
        "Duration of one split-check scan.",
        prometheus::exponential_buckets(0.0001, 2.0, 18).unwrap()
    )
    .unwrap()
});

pub static SPLITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_raft_splits_total",
        "Split commands applied by local replicas, by result (applied, rejected).",
        &["result"]
    )
    .unwrap()
});

pub static MEMBERSHIP_CHANGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_raft_membership_changes_total",
        "Membership change entries applied by local replicas, by result (applied, rejected).",
        &["result"]
    )
    .unwrap()
});

pub static REPLICA_LIFECYCLE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_replicas_lifecycle_total",
        "Replicas created on this node from a leader's message, and replicas destroyed after their removal, by event (created, destroyed).",
        &["event"]
    )
    .unwrap()
});

/// Creates the series of every known label value at zero, so rates and
/// alerts see them before the first event.
fn init_labels(v: &IntCounterVec, values: &[&str]) {
    for l in values {
        v.with_label_values(&[l]);
    }
}

/// Registers every metric of this module now, so /metrics lists them
/// (at zero) before first use.
pub fn register() {
    init_labels(&PROPOSALS, &["proposed", "refused", "dropped"]);
    init_labels(&PROPOSALS_DROPPED, &["stale", "indeterminate"]);
    init_labels(&READS, &["served", "refused", "not_leader"]);
    init_labels(&READ_PATHS, &["lease", "read_index", "follower", "stale"]);
    init_labels(&LEASE_RENEWALS, &["read_index", "commit"]);
    init_labels(
        &RAFT_MESSAGES_RECEIVED,
        &[
            "stepped",
            "rejected",
            "wrong_replica",
            "vote_held_off",
            "snapshot_refused",
            "dropped",
        ],
    );
    init_labels(
        &SNAPSHOTS,
        &[
            "generated",
            "generate_failed",
            "sent",
            "send_failed",
            "received",
            "applied",
        ],
    );
    init_labels(&SNAPSHOT_BYTES, &["sent", "received"]);
    for phase in ["generate", "send", "receive", "apply"] {
        SNAPSHOT_DURATION.with_label_values(&[phase]);
    }
    init_labels(&MEMBERSHIP_CHANGES, &["applied", "rejected"]);
    init_labels(&SPLITS, &["applied", "rejected"]);
    init_labels(&SPLIT_CHECKS, &["split", "split_load", "below", "failed"]);
    LazyLock::force(&SPLIT_CHECK_DURATION);
    init_labels(&REPLICA_LIFECYCLE, &["created", "destroyed"]);
    init_labels(&HIBERNATIONS, &["leader", "follower"]);
    init_labels(&HIBERNATE_REQUESTS, &["granted", "given_up"]);
    init_labels(
        &WAKEUPS,
        &[
            "request",
            "raft_message",
            "wake_up",
            "node_down",
            "node_up",
            "node_restarted",
        ],
    );
    init_labels(
        &PEER_NODE_EVENTS,
        &["node_down", "node_up", "node_restarted"],
    );
    LazyLock::force(&REPLICAS_HIBERNATED);
    LazyLock::force(&PEER_NODES_DOWN);
    LazyLock::force(&LIVENESS_STALLS);
    LazyLock::force(&PROPOSALS);
    LazyLock::force(&PROPOSAL_ENTRIES);
    LazyLock::force(&PROPOSALS_DROPPED);
    LazyLock::force(&COMMIT_DURATION);
    LazyLock::force(&APPLY_DURATION);
    LazyLock::force(&APPLY_WAIT);
    LazyLock::force(&APPLY_ROUND_DURATION);
    LazyLock::force(&APPLIED_ENTRIES);
    LazyLock::force(&POLL_ROUND_DURATION);
    LazyLock::force(&POLL_ROUND_FSMS);
    LazyLock::force(&POLL_ROUND_READIES);
    LazyLock::force(&READ_INDEX_REQUESTS);
    LazyLock::force(&READS);
    LazyLock::force(&READ_PATHS);
    LazyLock::force(&LEASE_RENEWALS);
    LazyLock::force(&RAFT_MESSAGES_RECEIVED);
    LazyLock::force(&LEADER_CHANGES);
    LazyLock::force(&SHARDS);
    LazyLock::force(&LEADERS);
    LazyLock::force(&PENDING_PROPOSALS);
    LazyLock::force(&SNAPSHOTS);
    LazyLock::force(&SNAPSHOT_DURATION);
    LazyLock::force(&SNAPSHOT_BYTES);
    LazyLock::force(&LOG_COMPACTIONS);
    LazyLock::force(&LEADER_TRANSFERS);
    LazyLock::force(&SHARDS_WITHOUT_LEADER);
    LazyLock::force(&REPLICAS_DOWN);
    LazyLock::force(&MEMBERSHIP_CHANGES);
    LazyLock::force(&REPLICA_LIFECYCLE);
    LazyLock::force(&RAFT_ENGINE_PURGES);
    LazyLock::force(&RAFT_ENGINE_PURGE_DURATION);
}
