//! `flotilla-ctl`: data and admin commands against a Flotilla cluster.
//!
//! Keys and values are taken as UTF-8 text, or as hex with `--hex`; output
//! shows text when it is printable UTF-8 and `0x…` hex otherwise.

use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::Table;
use flotilla_client::{Client, ClientConfig, ReadMode};
use flotilla_proto::meta::{Replica, ReplicaRole, ShardDescriptor};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(version, about = "Talk to a Flotilla cluster")]
struct Args {
    /// Comma-separated gRPC addresses of any cluster nodes.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:20161",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Keys and values on the command line are hex.
    #[arg(long, global = true)]
    hex: bool,
    /// Total time budget of the command, in seconds.
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    /// How get and scan read: leader (lease, else a quorum round),
    /// leader-read-index, follower (any replica, linearizable) or stale (any
    /// replica's applied state; may miss recent writes).
    #[arg(long, global = true, value_enum, default_value_t = ReadModeArg::Leader)]
    read_mode: ReadModeArg,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ReadModeArg {
    Leader,
    LeaderReadIndex,
    Follower,
    Stale,
}

impl From<ReadModeArg> for ReadMode {
    fn from(m: ReadModeArg) -> Self {
        match m {
            ReadModeArg::Leader => ReadMode::Leader,
            ReadModeArg::LeaderReadIndex => ReadMode::LeaderReadIndex,
            ReadModeArg::Follower => ReadMode::Follower,
            ReadModeArg::Stale => ReadMode::Stale,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write a key.
    Put { key: String, value: String },
    /// Read a key.
    Get { key: String },
    /// Delete a key.
    Delete { key: String },
    /// List pairs of [start, end) (empty end = to the end of the key space).
    Scan {
        #[arg(default_value = "")]
        start: String,
        #[arg(default_value = "")]
        end: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        reverse: bool,
    },
    /// Compare-and-swap: write only if the key's current state matches.
    Cas {
        key: String,
        /// Expected current value (omit with --expect-absent).
        #[arg(long, conflicts_with = "expect_absent")]
        expect: Option<String>,
        /// Expect the key to be absent.
        #[arg(long)]
        expect_absent: bool,
        /// New value (omit with --delete).
        #[arg(long, conflicts_with = "delete")]
        new: Option<String>,
        /// Delete the key instead of writing a value.
        #[arg(long)]
        delete: bool,
    },
    /// Cluster-wide views.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Shard views and operations.
    Shard {
        #[command(subcommand)]
        cmd: ShardCmd,
    },
    /// The node registry.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// The placement driver's operators.
    Operator {
        #[command(subcommand)]
        cmd: OperatorCmd,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Every node: address, labels, state, liveness, replicas and leaders.
    List,
    /// Move every replica off a node, then mark it removed (its id can
    /// never serve again). Returns at once; watch `node list`.
    Decommission { id: u64 },
}

#[derive(Subcommand, Debug)]
enum OperatorCmd {
    /// Operators running, then recently finished.
    List,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Nodes, their shards and leaders.
    Status,
}

#[derive(Subcommand, Debug)]
enum ShardCmd {
    /// Every shard: range, epoch, replicas, leader.
    List,
    /// One shard: each replica's role, term and log indexes
    /// (commit, applied, last, truncated).
    Describe { id: u64 },
    /// Add a replica on a node. It joins as a learner, catches up, then
    /// becomes a voter (unless --learner). Use a --timeout long enough for
    /// the shard's snapshot to travel.
    AddReplica {
        id: u64,
        #[arg(long)]
        node: u64,
        /// Leave the new replica a learner (it does not vote).
        #[arg(long)]
        learner: bool,
    },
    /// Remove the replica on a node (leadership moves away first).
    RemoveReplica {
        id: u64,
        #[arg(long)]
        node: u64,
    },
    /// Make the replica on a node the shard's leader.
    TransferLeader {
        id: u64,
        #[arg(long)]
        node: u64,
    },
    /// Split a shard at a key (strictly inside its range): the shard keeps
    /// the keys below it, a new shard on the same nodes takes the rest.
    Split {
        id: u64,
        /// The new shard's first key (hex with --hex).
        #[arg(long)]
        key: String,
    },
}

/// Bytes as MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// `id@nNODE`, with the role when it is not a plain voter.
fn replica_label(r: &Replica) -> String {
    let role = match ReplicaRole::try_from(r.role) {
        Ok(ReplicaRole::Voter) => "",
        Ok(ReplicaRole::Learner) => "(learner)",
        Ok(ReplicaRole::IncomingVoter) => "(incoming)",
        Ok(ReplicaRole::DemotingVoter) => "(demoting)",
        Err(_) => "(?)",
    };
    format!("{}@n{}{role}", r.id, r.node_id)
}

fn role_name(r: &Replica) -> &'static str {
    ReplicaRole::try_from(r.role).map_or("unknown", |r| r.as_str_name())
}

/// Prints a shard's descriptor after a membership change.
fn descriptor_json(d: &ShardDescriptor) -> serde_json::Value {
    let e = d.epoch();
    json!({
        "id": d.id, "conf_ver": e.conf_ver, "version": e.version,
        "start_key": show_bound(&d.start_key), "end_key": show_bound(&d.end_key),
        "replicas": d.replicas.iter().map(|r| json!({"id": r.id, "node_id": r.node_id, "role": role_name(r)})).collect::<Vec<_>>(),
    })
}

fn print_descriptor(d: &ShardDescriptor, json: bool) {
    let e = d.epoch();
    if json {
        println!("{}", descriptor_json(d));
    } else {
        let replicas: Vec<_> = d.replicas.iter().map(replica_label).collect();
        println!(
            "shard {} [{}, {}) epoch {}/{}: {}",
            d.id,
            show_bound(&d.start_key),
            show_bound(&d.end_key),
            e.conf_ver,
            e.version,
            replicas.join(" ")
        );
    }
}

fn parse(hex: bool, s: &str) -> anyhow::Result<Bytes> {
    if !hex {
        return Ok(Bytes::copy_from_slice(s.as_bytes()));
    }
    let s = s.strip_prefix("0x").unwrap_or(s);
    if !s.len().is_multiple_of(2) {
        bail!("hex input {s:?} has an odd number of digits");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map(Bytes::from)
        .with_context(|| format!("bad hex input {s:?}"))
}

/// Data as text when it is printable UTF-8, else as hex.
fn show(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => hex(b),
    }
}

/// A range bound: text only when every byte is visible ASCII (a space or
/// an accent would be misread in a table), else hex.
fn show_bound(b: &[u8]) -> String {
    if b.iter().all(u8::is_ascii_graphic) {
        String::from_utf8_lossy(b).into_owned()
    } else {
        hex(b)
    }
}

fn hex(b: &[u8]) -> String {
    let digits: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("0x{digits}")
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = ClientConfig {
        endpoints: args.endpoints.clone(),
        timeout: Duration::from_secs(args.timeout),
        ..Default::default()
    };
    let client = Client::connect(cfg)
        .await
        .with_context(|| format!("connecting to {}", args.endpoints.join(",")))?
        .with_read_mode(args.read_mode.into());
    let json = args.output == Output::Json;
    let hex = args.hex;
    match args.cmd {
        Cmd::Put { key, value } => {
            client.put(parse(hex, &key)?, parse(hex, &value)?).await?;
            if json {
                println!("{}", json!({"ok": true}));
            } else {
                println!("OK");
            }
        }
        Cmd::Get { key } => {
            let k = parse(hex, &key)?;
            let v = client.get(k.clone()).await?;
            if json {
                println!(
                    "{}",
                    json!({"key": show(&k), "found": v.is_some(), "value": v.as_deref().map(show)})
                );
            } else {
                match v {
                    Some(v) => println!("{}", show(&v)),
                    None => {
                        eprintln!("(not found)");
                        std::process::exit(2);
                    }
                }
            }
        }
        Cmd::Delete { key } => {
            client.delete(parse(hex, &key)?).await?;
            if json {
                println!("{}", json!({"ok": true}));
            } else {
                println!("OK");
            }
        }
        Cmd::Scan {
            start,
            end,
            limit,
            reverse,
        } => {
            let pairs = client
                .scan(parse(hex, &start)?, parse(hex, &end)?, limit, reverse)
                .await?;
            if json {
                let v: Vec<_> = pairs
                    .iter()
                    .map(|p| json!({"key": show(&p.key), "value": show(&p.value)}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                let rows = pairs
                    .iter()
                    .map(|p| vec![show(&p.key), show(&p.value)])
                    .collect();
                println!("{}", table(&["KEY", "VALUE"], rows));
            }
        }
        Cmd::Cas {
            key,
            expect,
            expect_absent,
            new,
            delete,
        } => {
            if expect.is_none() && !expect_absent {
                bail!("give --expect VALUE or --expect-absent");
            }
            if new.is_none() && !delete {
                bail!("give --new VALUE or --delete");
            }
            let expected = expect.map(|v| parse(hex, &v)).transpose()?;
            let new = new.map(|v| parse(hex, &v)).transpose()?;
            let r = client
                .compare_and_swap(parse(hex, &key)?, expected, new)
                .await?;
            if json {
                println!(
                    "{}",
                    json!({"succeeded": r.succeeded, "previous": r.previous.as_deref().map(show)})
                );
            } else {
                let prev = r.previous.as_deref().map(show).unwrap_or("(absent)".into());
                println!(
                    "{} (previous: {prev})",
                    if r.succeeded { "SUCCEEDED" } else { "FAILED" }
                );
                if !r.succeeded {
                    std::process::exit(3);
                }
            }
        }
        Cmd::Shard {
            cmd: ShardCmd::List,
        } => {
            let shards = client.list_shards().await?;
            if json {
                let v: Vec<_> = shards
                    .iter()
                    .map(|s| {
                        let d = &s.descriptor;
                        let e = d.epoch();
                        json!({
                            "id": d.id,
                            "start_key": show_bound(&d.start_key),
                            "end_key": show_bound(&d.end_key),
                            "conf_ver": e.conf_ver,
                            "version": e.version,
                            "replicas": d.replicas.iter().map(|r| json!({"id": r.id, "node_id": r.node_id, "role": role_name(r)})).collect::<Vec<_>>(),
                            "leader_node": s.leader_node,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                let rows = shards
                    .iter()
                    .map(|s| {
                        let d = &s.descriptor;
                        let e = d.epoch();
                        vec![
                            d.id.to_string(),
                            show(&d.start_key),
                            if d.end_key.is_empty() {
                                "+inf".into()
                            } else {
                                show(&d.end_key)
                            },
                            format!("{}/{}", e.conf_ver, e.version),
                            d.replicas
                                .iter()
                                .map(replica_label)
                                .collect::<Vec<_>>()
                                .join(" "),
                            if s.leader_node == 0 {
                                "?".into()
                            } else {
                                format!("n{}", s.leader_node)
                            },
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &[
                            "SHARD",
                            "START",
                            "END",
                            "EPOCH (conf/ver)",
                            "REPLICAS",
                            "LEADER"
                        ],
                        rows
                    )
                );
            }
        }
        Cmd::Shard {
            cmd: ShardCmd::Describe { id },
        } => {
            let shards = client.list_shards().await?;
            let Some(shard) = shards.into_iter().find(|s| s.descriptor.id == id) else {
                bail!("no shard {id}");
            };
            let nodes: std::collections::HashMap<u64, String> =
                client.nodes().into_iter().collect();
            let d = &shard.descriptor;
            let mut rows = Vec::new();
            let mut replicas_json = Vec::new();
            for r in &d.replicas {
                let addr = nodes.get(&r.node_id).cloned().unwrap_or_default();
                match client.replica_status(&addr, id).await {
                    Ok(s) => {
                        rows.push(vec![
                            format!("n{}", r.node_id),
                            r.id.to_string(),
                            s.role.clone(),
                            s.term.to_string(),
                            s.commit_index.to_string(),
                            s.applied_index.to_string(),
                            s.last_index.to_string(),
                            s.truncated_index.to_string(),
                            s.pending_proposals.to_string(),
                            if s.hibernated { "yes" } else { "no" }.into(),
                        ]);
                        replicas_json.push(json!({
                            "node_id": r.node_id, "replica_id": r.id, "up": true, "role": s.role,
                            "term": s.term, "leader_replica_id": s.leader_replica_id,
                            "commit_index": s.commit_index, "applied_index": s.applied_index,
                            "last_index": s.last_index, "truncated_index": s.truncated_index,
                            "pending_proposals": s.pending_proposals, "hibernated": s.hibernated,
                        }));
                    }
                    Err(e) => {
                        rows.push(vec![
                            format!("n{}", r.node_id),
                            r.id.to_string(),
                            "DOWN".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                        ]);
                        replicas_json.push(json!({"node_id": r.node_id, "replica_id": r.id, "up": false, "error": e.to_string()}));
                    }
                }
            }
            let e = d.epoch();
            if json {
                println!(
                    "{}",
                    json!({
                        "id": d.id, "start_key": show_bound(&d.start_key), "end_key": show_bound(&d.end_key),
                        "conf_ver": e.conf_ver, "version": e.version, "replicas": replicas_json,
                    })
                );
            } else {
                let end = if d.end_key.is_empty() {
                    "+inf".into()
                } else {
                    show_bound(&d.end_key)
                };
                let start = if d.start_key.is_empty() {
                    "-inf".into()
                } else {
                    show_bound(&d.start_key)
                };
                println!(
                    "shard {} [{start}, {end}) epoch {}/{}",
                    d.id, e.conf_ver, e.version
                );
                println!(
                    "{}",
                    table(
                        &[
                            "NODE",
                            "REPLICA",
                            "ROLE",
                            "TERM",
                            "COMMIT",
                            "APPLIED",
                            "LAST",
                            "TRUNCATED",
                            "PENDING",
                            "HIBERNATED"
                        ],
                        rows
                    )
                );
            }
        }
        Cmd::Shard {
            cmd: ShardCmd::AddReplica { id, node, learner },
        } => print_descriptor(&client.add_replica(id, node, !learner).await?, json),
        Cmd::Shard {
            cmd: ShardCmd::RemoveReplica { id, node },
        } => print_descriptor(&client.remove_replica(id, node).await?, json),
        Cmd::Shard {
            cmd: ShardCmd::Split { id, key },
        } => {
            let (left, right) = client.split_shard(id, parse(hex, &key)?).await?;
            if json {
                println!(
                    "{}",
                    json!({"left": descriptor_json(&left), "right": descriptor_json(&right)})
                );
            } else {
                print_descriptor(&left, false);
                print_descriptor(&right, false);
            }
        }
        Cmd::Shard {
            cmd: ShardCmd::TransferLeader { id, node },
        } => {
            client.transfer_leader(id, node).await?;
            if json {
                println!("{}", json!({"id": id, "leader_node": node}));
            } else {
                println!("shard {id} is led by node {node}");
            }
        }
        Cmd::Node { cmd: NodeCmd::List } => {
            let nodes = client.list_nodes().await?;
            let state = |n: &flotilla_proto::meta::Node| format!("{:?}", n.state()).to_lowercase();
            let labels = |n: &flotilla_proto::meta::Node| {
                n.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            if json {
                let v: Vec<_> = nodes
                    .iter()
                    .map(|i| {
                        let n = i.node.clone().unwrap_or_default();
                        let s = i.stats.unwrap_or_default();
                        json!({
                            "id": n.id, "address": n.address, "labels": labels(&n),
                            "state": state(&n), "liveness": i.liveness,
                            "last_heartbeat_ms": i.last_heartbeat_ms,
                            "replicas": s.replicas, "leaders": s.leaders,
                            "disk_available_bytes": s.disk_available_bytes,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                let rows = nodes
                    .iter()
                    .map(|i| {
                        let n = i.node.clone().unwrap_or_default();
                        let s = i.stats.unwrap_or_default();
                        vec![
                            n.id.to_string(),
                            n.address.clone(),
                            labels(&n),
                            state(&n),
                            i.liveness.clone(),
                            s.replicas.to_string(),
                            s.leaders.to_string(),
                            mib(s.disk_available_bytes),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &[
                            "NODE",
                            "ADDRESS",
                            "LABELS",
                            "STATE",
                            "LIVENESS",
                            "REPLICAS",
                            "LEADERS",
                            "DISK FREE"
                        ],
                        rows
                    )
                );
            }
        }
        Cmd::Node {
            cmd: NodeCmd::Decommission { id },
        } => {
            let n = client.decommission_node(id).await?;
            let state = format!("{:?}", n.state()).to_lowercase();
            if json {
                println!("{}", json!({"id": n.id, "state": state}));
            } else {
                println!(
                    "node {} is {state}; its replicas move away (watch `node list`)",
                    n.id
                );
            }
        }
        Cmd::Operator {
            cmd: OperatorCmd::List,
        } => {
            let ops = client.list_operators().await?;
            if json {
                let v: Vec<_> = ops
                    .iter()
                    .map(|o| {
                        json!({
                            "id": o.id, "shard_id": o.shard_id, "kind": o.kind,
                            "from_node": o.from_node, "to_node": o.to_node,
                            "reason": o.reason, "status": o.status,
                            "age_ms": o.age_ms, "error": o.error,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                let node = |n: u64| {
                    if n == 0 {
                        "-".to_string()
                    } else {
                        n.to_string()
                    }
                };
                let rows = ops
                    .iter()
                    .map(|o| {
                        vec![
                            o.id.to_string(),
                            o.shard_id.to_string(),
                            o.kind.clone(),
                            node(o.from_node),
                            node(o.to_node),
                            o.reason.clone(),
                            o.status.clone(),
                            format!("{:.1}s", o.age_ms as f64 / 1000.0),
                            o.error.clone(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &["ID", "SHARD", "KIND", "FROM", "TO", "REASON", "STATUS", "AGE", "ERROR"],
                        rows
                    )
                );
            }
        }
        Cmd::Cluster {
            cmd: ClusterCmd::Status,
        } => {
            let shards = client.list_shards().await?;
            let mut rows = Vec::new();
            let mut nodes_json = Vec::new();
            for (id, addr) in client.nodes() {
                match client.node_status(&addr).await {
                    Ok(s) => {
                        rows.push(vec![
                            id.to_string(),
                            addr.clone(),
                            "up".into(),
                            s.replicas.to_string(),
                            s.leaders.to_string(),
                            s.replicas_without_leader.to_string(),
                            s.replicas_down.to_string(),
                            mib(s.raft_engine_bytes),
                            mib(s.rocksdb_bytes),
                            mib(s.disk_available_bytes),
                            format!("{}s", s.uptime_seconds),
                        ]);
                        nodes_json.push(json!({"id": id, "address": addr, "up": true, "replicas": s.replicas, "leaders": s.leaders, "replicas_without_leader": s.replicas_without_leader, "replicas_down": s.replicas_down, "raft_engine_bytes": s.raft_engine_bytes, "rocksdb_bytes": s.rocksdb_bytes, "disk_available_bytes": s.disk_available_bytes, "uptime_seconds": s.uptime_seconds, "version": s.version}));
                    }
                    Err(e) => {
                        let mut row = vec![id.to_string(), addr.clone(), "DOWN".into()];
                        row.resize(11, "-".into());
                        rows.push(row);
                        nodes_json.push(
                            json!({"id": id, "address": addr, "up": false, "error": e.to_string()}),
                        );
                    }
                }
            }
            let without_leader = shards.iter().filter(|s| s.leader_node == 0).count();
            if json {
                println!(
                    "{}",
                    json!({"nodes": nodes_json, "shards": shards.len(), "shards_without_known_leader": without_leader})
                );
            } else {
                println!(
                    "{}",
                    table(
                        &[
                            "NODE",
                            "ADDRESS",
                            "STATE",
                            "REPLICAS",
                            "LEADERS",
                            "NO LEADER",
                            "PEERS DOWN",
                            "RAFT LOG",
                            "ROCKSDB",
                            "DISK FREE",
                            "UPTIME"
                        ],
                        rows
                    )
                );
                println!(
                    "{} shards, {} without a known leader",
                    shards.len(),
                    without_leader
                );
            }
        }
    }
    Ok(())
}
