//! Raftstore tuning. Defaults follow etcd's timing (100 ms heartbeat, 1 s
//! election) rather than TiKV's (1 s tick, 10 s election) because a node of
//! Flotilla is expected to fail over in about a second.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    /// Raft poller threads.
    pub raft_pollers: usize,
    /// Apply poller threads.
    pub apply_pollers: usize,
    /// Most FSMs handled in one poll round.
    pub max_batch_size: usize,
    /// Times a raft poller yields the CPU after the first replica of a
    /// round is ready, before taking the rest (bigger rounds under load).
    pub raft_round_yields: usize,
    /// Most messages a replica handles in one round before yielding.
    pub messages_per_tick: usize,
    /// Soft capacity of each replica's mailbox, in messages.
    pub mailbox_capacity: usize,
    /// One Raft logical clock tick.
    pub tick_interval: Duration,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Ticks without a leader before a follower campaigns (randomised in
    /// [election_ticks, 2 * election_ticks)).
    pub election_ticks: usize,
    /// How long a quorum-acknowledged round lets the leader serve reads
    /// without asking the others (zero: never). Below
    /// `(election_ticks - 1) * tick_interval`; see `replica::lease`.
    pub leader_lease: Duration,
    /// Bytes of entries in one append message.
    pub max_size_per_msg: u64,
    /// Append messages in flight per follower.
    pub max_inflight_msgs: usize,
    /// Bytes of proposed but uncommitted entries per shard before proposals
    /// are refused with ServerIsBusy.
    pub max_uncommitted_size: u64,
    /// Bytes of client commands batched into one log entry.
    pub max_entry_size: usize,
    /// Ticks a leader that lost leadership waits for the outcome of its
    /// pending proposals before answering them Indeterminate.
    pub abandon_proposals_after_ticks: usize,
    /// Ticks between a leader's log-compaction checks.
    pub raft_log_gc_ticks: usize,
    /// Entries a compaction must remove at least (smaller ones wait).
    pub raft_log_gc_threshold: u64,
    /// Entries in a shard's log past which the leader compacts even if a
    /// follower still needs them (it then gets a snapshot).
    pub raft_log_gc_count_limit: u64,
    /// Bytes of a shard's log past which the same happens.
    pub raft_log_gc_size_limit: u64,
    /// How often raft-engine purges files no log needs.
    pub raft_engine_purge_interval: Duration,
    /// Threads building snapshots and hashing shards.
    pub snap_workers: usize,
    /// Ticks between a leader's checks of its shard against the split
    /// thresholds (0 = no size-based splits). A check scans the shard only
    /// after enough was written since the last one (1/16 of a threshold).
    pub split_check_ticks: usize,
    /// Bytes (keys plus values) past which a shard splits at its middle.
    pub split_size: u64,
    /// Keys past which a shard splits at its middle.
    pub split_keys: u64,
    /// Reads per second (over a check interval) past which a leader splits
    /// its shard at the median key of its reads (0 = off).
    pub split_qps: u64,
    /// Idle shards stop ticking (`replica::fsm::hibernate`).
    pub hibernate: bool,
    /// Ticks a leader must be idle, with every replica up to date, before
    /// its shard hibernates.
    pub hibernate_after_ticks: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            raft_pollers: 1,
            apply_pollers: 2,
            max_batch_size: 256,
            raft_round_yields: 2,
            messages_per_tick: 4096,
            mailbox_capacity: 40960,
            tick_interval: Duration::from_millis(100),
            heartbeat_ticks: 2,
            election_ticks: 10,
            // 900 ms of follower hold-off minus 100 ms (11 %) for drift.
            leader_lease: Duration::from_millis(800),
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_uncommitted_size: 64 << 20,
            max_entry_size: 1 << 20,
            abandon_proposals_after_ticks: 20,
            raft_log_gc_ticks: 30,
            raft_log_gc_threshold: 50,
            raft_log_gc_count_limit: 20_000,
            raft_log_gc_size_limit: 64 << 20,
            raft_engine_purge_interval: Duration::from_secs(10),
            snap_workers: 2,
            split_check_ticks: 0,
            split_size: 96 << 20,
            split_keys: 960_000,
            split_qps: 0,
            hibernate: true,
            hibernate_after_ticks: 10,
        }
    }
}

impl Config {
    pub fn election_timeout(&self) -> Duration {
        self.tick_interval * self.election_ticks as u32
    }

    /// `(election_ticks - 1) * tick_interval`: the least real time a
    /// follower holds off other candidates after hearing from its leader,
    /// which the leader lease stays below (`replica::lease`).
    pub fn lease_bound(&self) -> Duration {
        self.tick_interval * self.election_ticks.saturating_sub(1) as u32
    }
}
