//! Node configuration: a TOML file (see `etc/flotilla.toml`, where every key
//! is documented with its default and unit) overridden by command-line flags.
//! Keys are kebab-case; sizes are bytes, durations milliseconds, both named
//! in the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub raftstore: RaftstoreSection,
    pub raft_engine: RaftEngineSection,
    pub rocksdb: RocksdbSection,
    pub limits: Limits,
    pub log: LogSection,
    pub placement: PlacementSection,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct PlacementSection {
    /// How often a node reports the shards it leads to the meta shard and
    /// refreshes its routing directory from it.
    pub heartbeat_interval_ms: u64,
    /// How often each shard leader checks whether its shard outgrew the
    /// split thresholds (0 turns size-based splitting off).
    pub split_check_interval_ms: u64,
    /// A shard whose data passes this many bytes (approximate) is split in
    /// two at its middle key.
    pub split_size_bytes: u64,
    /// A shard holding more keys than this is split in two.
    pub split_keys: u64,
    /// A shard whose leader serves more reads per second than this (over a
    /// split-check interval) is split at the median key of its reads (0
    /// turns load-based splitting off). Writes do not count: see
    /// `flotilla_raftstore::replica::load`.
    pub split_qps: u64,
    /// How often the placement driver (on the meta shard's leader) looks
    /// at the cluster and starts operators.
    pub schedule_interval_ms: u64,
    /// A node silent this long is down: its replicas are re-created on
    /// other nodes.
    pub max_down_time_ms: u64,
    /// Replicas per shard (fewer while there are fewer healthy nodes). The
    /// meta shard has 5 once there are 5 nodes, else 3.
    pub max_replicas: usize,
    /// Operators running at once.
    pub max_operators: usize,
    /// An operator running longer than this is given up (and its shard
    /// looked at again).
    pub operator_timeout_ms: u64,
}

impl Default for PlacementSection {
    fn default() -> Self {
        PlacementSection {
            heartbeat_interval_ms: 2000,
            split_check_interval_ms: 10_000,
            split_size_bytes: 96 << 20,
            split_keys: 960_000,
            split_qps: 3000,
            schedule_interval_ms: 1000,
            max_down_time_ms: 30 * 60 * 1000,
            max_replicas: 3,
            max_operators: 8,
            operator_timeout_ms: 10 * 60 * 1000,
        }
    }
}

impl PlacementSection {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerSection {
    /// This node's id, unique in the cluster (flag `--node-id`).
    pub node_id: u64,
    /// gRPC address (Kv, Admin and Raft services).
    pub addr: String,
    /// Address for /health, /ready, /metrics and /status.
    pub status_addr: String,
    /// Data directory: `raft/` (raft-engine) and `kv/` (RocksDB) live here.
    pub data_dir: PathBuf,
    /// `id=host:port,...` of every node of a new cluster.
    pub initial_cluster: String,
    /// Shards created when a new cluster is bootstrapped.
    pub initial_shards: usize,
    /// How long a request may wait for its command to apply or its read to
    /// be confirmed.
    pub request_timeout_ms: u64,
    /// Free bytes below which client writes are refused (and below half of
    /// which replicas also refuse new log entries).
    pub reserve_space_bytes: u64,
    /// How often free space is checked.
    pub disk_check_interval_ms: u64,
    /// Any members of a running cluster (`host:port,...`): a new data dir
    /// joins that cluster instead of bootstrapping one.
    pub join: String,
    /// Placement labels, `key=value,...` (e.g. `zone=a`): replicas of a
    /// shard go to distinct zones first.
    pub labels: String,
    /// Record the per-request and per-round histograms (latencies, batch
    /// sizes). Off saves their cost on the hot path; counters and gauges
    /// stay.
    pub detailed_metrics: bool,
    /// Threads of the async runtime that serves gRPC (client requests and
    /// Raft messages between nodes); 0 = one per CPU.
    pub grpc_threads: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            node_id: 0,
            addr: "127.0.0.1:20161".into(),
            status_addr: "127.0.0.1:20181".into(),
            data_dir: PathBuf::from("data"),
            initial_cluster: String::new(),
            initial_shards: 8,
            join: String::new(),
            labels: String::new(),
            request_timeout_ms: 10_000,
            reserve_space_bytes: 512 << 20,
            disk_check_interval_ms: 500,
            detailed_metrics: true,
            grpc_threads: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RaftstoreSection {
    pub raft_pollers: usize,
    pub apply_pollers: usize,
    pub max_batch_size: usize,
    pub raft_round_yields: usize,
    pub messages_per_tick: usize,
    pub mailbox_capacity: usize,
    pub tick_interval_ms: u64,
    pub heartbeat_ticks: usize,
    pub election_ticks: usize,
    /// None: 8/9 of the safe bound, see `leader_lease`.
    pub leader_lease_ms: Option<u64>,
    pub max_size_per_msg_bytes: u64,
    pub max_inflight_msgs: usize,
    pub max_uncommitted_size_bytes: u64,
    pub max_entry_size_bytes: usize,
    pub abandon_proposals_after_ticks: usize,
    pub raft_log_gc_ticks: usize,
    pub raft_log_gc_threshold: u64,
    pub raft_log_gc_count_limit: u64,
    pub raft_log_gc_size_limit_bytes: u64,
    pub raft_engine_purge_interval_ms: u64,
    pub snap_workers: usize,
    pub snap_max_concurrent_send: usize,
    pub snap_max_concurrent_recv: usize,
    pub snap_chunk_size_bytes: usize,
    pub snap_send_timeout_ms: u64,
    pub snap_max_send_bytes_per_sec: u64,
    pub hibernate: bool,
    pub hibernate_after_ticks: usize,
}

impl Default for RaftstoreSection {
    fn default() -> Self {
        let d = flotilla_raftstore::Config::default();
        let s = flotilla_transport::SnapshotConfig::default();
        RaftstoreSection {
            raft_pollers: d.raft_pollers,
            apply_pollers: d.apply_pollers,
            max_batch_size: d.max_batch_size,
            raft_round_yields: d.raft_round_yields,
            messages_per_tick: d.messages_per_tick,
            mailbox_capacity: d.mailbox_capacity,
            tick_interval_ms: d.tick_interval.as_millis() as u64,
            heartbeat_ticks: d.heartbeat_ticks,
            election_ticks: d.election_ticks,
            leader_lease_ms: None,
            max_size_per_msg_bytes: d.max_size_per_msg,
            max_inflight_msgs: d.max_inflight_msgs,
            max_uncommitted_size_bytes: d.max_uncommitted_size,
            max_entry_size_bytes: d.max_entry_size,
            abandon_proposals_after_ticks: d.abandon_proposals_after_ticks,
            raft_log_gc_ticks: d.raft_log_gc_ticks,
            raft_log_gc_threshold: d.raft_log_gc_threshold,
            raft_log_gc_count_limit: d.raft_log_gc_count_limit,
            raft_log_gc_size_limit_bytes: d.raft_log_gc_size_limit,
            raft_engine_purge_interval_ms: d.raft_engine_purge_interval.as_millis() as u64,
            snap_workers: d.snap_workers,
            snap_max_concurrent_send: s.max_concurrent_send,
            snap_max_concurrent_recv: s.max_concurrent_recv,
            snap_chunk_size_bytes: s.chunk_bytes,
            snap_send_timeout_ms: s.send_timeout.as_millis() as u64,
            snap_max_send_bytes_per_sec: s.max_send_bytes_per_sec,
            hibernate: d.hibernate,
            hibernate_after_ticks: d.hibernate_after_ticks,
        }
    }
}

impl RaftstoreSection {
    /// The raftstore's configuration; the split thresholds come from
    /// `[placement]`.
    pub fn to_raftstore(&self, p: &PlacementSection) -> flotilla_raftstore::Config {
        flotilla_raftstore::Config {
            raft_pollers: self.raft_pollers,
            apply_pollers: self.apply_pollers,
            max_batch_size: self.max_batch_size,
            raft_round_yields: self.raft_round_yields,
            messages_per_tick: self.messages_per_tick,
            mailbox_capacity: self.mailbox_capacity,
            tick_interval: Duration::from_millis(self.tick_interval_ms),
            heartbeat_ticks: self.heartbeat_ticks,
            election_ticks: self.election_ticks,
            leader_lease: self.leader_lease(),
            max_size_per_msg: self.max_size_per_msg_bytes,
            max_inflight_msgs: self.max_inflight_msgs,
            max_uncommitted_size: self.max_uncommitted_size_bytes,
            max_entry_size: self.max_entry_size_bytes,
            abandon_proposals_after_ticks: self.abandon_proposals_after_ticks,
            raft_log_gc_ticks: self.raft_log_gc_ticks,
            raft_log_gc_threshold: self.raft_log_gc_threshold,
            raft_log_gc_count_limit: self.raft_log_gc_count_limit,
            raft_log_gc_size_limit: self.raft_log_gc_size_limit_bytes,
            raft_engine_purge_interval: Duration::from_millis(self.raft_engine_purge_interval_ms),
            snap_workers: self.snap_workers,
            split_check_ticks: if p.split_check_interval_ms == 0 {
                0
            } else {
                (p.split_check_interval_ms / self.tick_interval_ms).max(1) as usize
            },
            split_size: p.split_size_bytes,
            split_keys: p.split_keys,
            split_qps: p.split_qps,
            hibernate: self.hibernate,
            hibernate_after_ticks: self.hibernate_after_ticks,
        }
    }

    /// Followers hold off other candidates for election-ticks ticks after
    /// hearing from the leader, which spans at least (election-ticks - 1)
    /// tick intervals; a lease must end before that (see
    /// flotilla_raftstore::replica::lease).
    fn lease_bound_ms(&self) -> u64 {
        (self.election_ticks as u64).saturating_sub(1) * self.tick_interval_ms
    }

    /// The configured lease, or 8/9 of the bound (800 ms with the default
    /// timing), leaving 11 % for clock-rate drift.
    pub fn leader_lease(&self) -> Duration {
        Duration::from_millis(
            self.leader_lease_ms
                .unwrap_or(self.lease_bound_ms() * 8 / 9),
        )
    }

    pub fn to_snapshot(&self) -> flotilla_transport::SnapshotConfig {
        flotilla_transport::SnapshotConfig {
            max_concurrent_send: self.snap_max_concurrent_send,
            max_concurrent_recv: self.snap_max_concurrent_recv,
            chunk_bytes: self.snap_chunk_size_bytes,
            send_timeout: Duration::from_millis(self.snap_send_timeout_ms),
            max_send_bytes_per_sec: self.snap_max_send_bytes_per_sec,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RaftEngineSection {
    pub target_file_size_bytes: u64,
    pub purge_threshold_bytes: u64,
    pub batch_compression_threshold_bytes: u64,
    pub enable_log_recycle: bool,
    pub prefill_bytes: u64,
}

impl Default for RaftEngineSection {
    fn default() -> Self {
        let d = flotilla_storage::RaftLogConfig::default();
        RaftEngineSection {
            target_file_size_bytes: d.target_file_size,
            purge_threshold_bytes: d.purge_threshold,
            batch_compression_threshold_bytes: d.batch_compression_threshold,
            enable_log_recycle: d.enable_log_recycle,
            prefill_bytes: d.prefill_bytes,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RocksdbSection {
    pub block_cache_size_bytes: usize,
    pub write_buffer_size_bytes: usize,
    pub max_background_jobs: i32,
    pub max_open_files: i32,
}

impl Default for RocksdbSection {
    fn default() -> Self {
        let d = flotilla_storage::KvConfig::default();
        RocksdbSection {
            block_cache_size_bytes: d.block_cache_size,
            write_buffer_size_bytes: d.write_buffer_size,
            max_background_jobs: d.max_background_jobs,
            max_open_files: d.max_open_files,
        }
    }
}

/// Request limits. A request over any of them fails with INVALID_ARGUMENT
/// naming the limit, and writes nothing.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Limits {
    pub max_key_size_bytes: usize,
    pub max_value_size_bytes: usize,
    /// Keys (or pairs) in one BatchGet or BatchPut.
    pub max_batch_keys: usize,
    /// Encoded size of one request.
    pub max_request_size_bytes: usize,
    /// Most pairs one Scan returns; larger limits are cut to it (the
    /// response says `more`).
    pub max_scan_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_size_bytes: 4096,
            max_value_size_bytes: 1 << 20,
            max_batch_keys: 1024,
            max_request_size_bytes: 4 << 20,
            max_scan_limit: 10_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct LogSection {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a full `RUST_LOG`-style
    /// filter. `RUST_LOG`, when set, wins.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// A node of `--initial-cluster`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitialNode {
    pub id: u64,
    pub addr: String,
}

impl Config {
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }

    /// Parses `--initial-cluster` (`1=host:port,2=host:port`).
    pub fn initial_cluster(&self) -> anyhow::Result<Vec<InitialNode>> {
        parse_initial_cluster(&self.server.initial_cluster)
    }

    /// Checks values that would make the node misbehave.
    /// `server.labels` as a map.
    pub fn labels(&self) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let mut m = std::collections::BTreeMap::new();
        for part in self
            .server
            .labels
            .split(',')
            .filter(|p| !p.trim().is_empty())
        {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("server.labels: {part:?} is not key=value"))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || v.is_empty() {
                anyhow::bail!("server.labels: {part:?} needs a key and a value");
            }
            m.insert(k.to_string(), v.to_string());
        }
        Ok(m)
    }

    /// `server.join` as addresses.
    pub fn join(&self) -> Vec<String> {
        self.server
            .join
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.server.node_id == 0 {
            bail!("server.node-id (--node-id) must be set to a non-zero id");
        }
        self.server
            .addr
            .parse::<SocketAddr>()
            .map_err(|e| anyhow::anyhow!("server.addr {:?}: {e}", self.server.addr))?;
        self.server.status_addr.parse::<SocketAddr>().map_err(|e| {
            anyhow::anyhow!("server.status-addr {:?}: {e}", self.server.status_addr)
        })?;
        let r = &self.raftstore;
        if r.heartbeat_ticks == 0 || r.election_ticks <= r.heartbeat_ticks {
            bail!("raftstore.election-ticks must exceed raftstore.heartbeat-ticks (> 0)");
        }
        if r.raft_pollers == 0 || r.apply_pollers == 0 {
            bail!("raftstore.raft-pollers and raftstore.apply-pollers must be at least 1");
        }
        if r.tick_interval_ms == 0 {
            bail!("raftstore.tick-interval-ms must be at least 1");
        }
        if r.hibernate && r.hibernate_after_ticks == 0 {
            bail!("raftstore.hibernate-after-ticks must be at least 1 (or hibernate = false)");
        }
        if let Some(lease) = r.leader_lease_ms {
            let bound = r.lease_bound_ms();
            if lease > 0 && lease >= bound {
                bail!(
                    "raftstore.leader-lease-ms = {lease} must be below (election-ticks - 1) * tick-interval-ms = {bound} (leave a margin for clock drift; 0 turns lease reads off)"
                );
            }
        }
        if !(1..=65536).contains(&self.server.initial_shards) {
            bail!("server.initial-shards must be in 1..=65536");
        }
        let p = &self.placement;
        if p.heartbeat_interval_ms == 0 || p.schedule_interval_ms == 0 {
            bail!("placement.heartbeat-interval-ms and placement.schedule-interval-ms must be at least 1");
        }
        if p.max_replicas == 0 || p.max_operators == 0 || p.operator_timeout_ms == 0 {
            bail!("placement.max-replicas, placement.max-operators and placement.operator-timeout-ms must be at least 1");
        }
        if p.max_down_time_ms < 2 * p.heartbeat_interval_ms {
            bail!(
                "placement.max-down-time-ms ({}) must be at least two heartbeat intervals ({})",
                p.max_down_time_ms,
                2 * p.heartbeat_interval_ms
            );
        }
        self.labels()?;
        if p.split_check_interval_ms > 0 && (p.split_size_bytes == 0 || p.split_keys < 2) {
            bail!("placement.split-size-bytes must be > 0 and placement.split-keys >= 2 (or placement.split-check-interval-ms = 0 to turn splitting off)");
        }
        let l = &self.limits;
        if l.max_key_size_bytes == 0 || l.max_batch_keys == 0 || l.max_scan_limit == 0 {
            bail!("limits must be non-zero");
        }
        let re = &self.raft_engine;
        if re.target_file_size_bytes == 0 || re.purge_threshold_bytes < re.target_file_size_bytes {
            bail!(
                "raft-engine.purge-threshold-bytes ({}) must be at least raft-engine.target-file-size-bytes ({}, > 0)",
                re.purge_threshold_bytes,
                re.target_file_size_bytes
            );
        }
        if re.prefill_bytes > 0 && !re.enable_log_recycle {
            bail!("raft-engine.prefill-bytes needs raft-engine.enable-log-recycle = true (prefilled files are recycled files)");
        }
        Ok(())
    }
}

pub fn parse_initial_cluster(s: &str) -> anyhow::Result<Vec<InitialNode>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("initial-cluster entry {part:?} is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("initial-cluster entry {part:?}: bad node id"))?;
        if id == 0 {
            anyhow::bail!("initial-cluster entry {part:?}: node id must be non-zero");
        }
        if out.iter().any(|n: &InitialNode| n.id == id) {
            anyhow::bail!("initial-cluster lists node {id} twice");
        }
        out.push(InitialNode {
            id,
            addr: addr.trim().to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_file_parses_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../etc/flotilla.toml");
        let c = Config::from_file(&path).unwrap();
        let d = Config::default();
        assert_eq!(c.raftstore.election_ticks, d.raftstore.election_ticks);
        assert_eq!(c.raftstore.leader_lease(), d.raftstore.leader_lease());
        assert_eq!(d.raftstore.leader_lease(), Duration::from_millis(800));
        assert_eq!(c.limits.max_key_size_bytes, d.limits.max_key_size_bytes);
        assert_eq!(c.limits.max_value_size_bytes, d.limits.max_value_size_bytes);
        assert_eq!(c.server.initial_shards, d.server.initial_shards);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("[server]\nnode-idd = 1\n").is_err());
    }

    #[test]
    fn initial_cluster_parses_and_rejects_garbage() {
        let n = parse_initial_cluster("1=127.0.0.1:1, 2=127.0.0.1:2").unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[1].addr, "127.0.0.1:2");
        assert!(parse_initial_cluster("1=a,1=b").is_err());
        assert!(parse_initial_cluster("x=a").is_err());
        assert!(parse_initial_cluster("1").is_err());
    }
}
