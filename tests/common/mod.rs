//! Clusters of real `flotilla-server` processes on free loopback ports, for
//! end-to-end, crash and fail point tests. `kill -9` means SIGKILL.

#![allow(dead_code)]

pub mod net;
pub mod workload;

/// Compaction every half second once 100 entries pile up, so snapshots and
/// log truncation happen within a test.
pub const SMALL_LOGS: &str = "
[raftstore]
raft-log-gc-ticks = 5
raft-log-gc-threshold = 10
raft-log-gc-count-limit = 100
";

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use flotilla_client::{Client, ClientConfig};
use flotilla_proto::admin::admin_client::AdminClient;
use flotilla_proto::admin::{ComputeHashRequest, ShardHashRequest};

/// Checks the output of `flotilla-bench check`: it must have exited 0 with
/// a linearizable verdict (else panics with `stdout` and `log`). Returns
/// the number of operations checked.
pub fn assert_linearizable(status: ExitStatus, stdout: &str, log: &str) -> usize {
    assert!(
        status.success() && stdout.contains(": linearizable"),
        "the history is not linearizable (or the check did not finish):\n{stdout}\n{log}"
    );
    stdout
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Node {
    pub id: u64,
    pub grpc: String,
    pub status: String,
    pub data: PathBuf,
    log: PathBuf,
    pub args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    /// Node `id` of a cluster laid out in `dir` (config `dir/flotilla.toml`)
    /// on loopback ports (gRPC, status); `how` says how it joins: a new
    /// cluster's flags or `--join`.
    fn layout(dir: &Path, id: u64, (grpc, status): (u16, u16), how: Vec<String>) -> Node {
        let grpc = format!("127.0.0.1:{grpc}");
        let status = format!("127.0.0.1:{status}");
        let data = dir.join(format!("node{id}"));
        let mut args: Vec<String> = vec![
            "--config".into(),
            dir.join("flotilla.toml").display().to_string(),
            "--node-id".into(),
            id.to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--addr".into(),
            grpc.clone(),
            "--status-addr".into(),
            status.clone(),
        ];
        args.extend(how);
        Node {
            id,
            grpc,
            status,
            log: dir.join(format!("node{id}.log")),
            data,
            args,
            child: None,
        }
    }

    /// Starts the process; `env` adds variables (FAILPOINTS, RUST_LOG...).
    pub fn start_with(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-server"));
        cmd.args(&self.args)
            .env("RUST_LOG", "info")
            .env_remove("FAILPOINTS")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn flotilla-server"));
    }

    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal by name (STOP, CONT...) to the running process.
    pub fn signal(&mut self, sig: &str) {
        let pid = self.pid();
        let ok = Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {pid} failed");
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "node {} did not exit", self.id);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(&self.status).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut bytes = Vec::new();
        // A slow or kept-open connection ends the read at the timeout; keep
        // what arrived.
        let _ = s.read_to_end(&mut bytes);
        let out = String::from_utf8_lossy(&bytes).into_owned();
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, out))
    }

    /// One series' value in this node's /metrics.
    pub fn metric(&self, series: &str) -> f64 {
        let (code, text) = self.http_get("/metrics").expect("metrics");
        assert_eq!(code, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.http_get("/ready").map(|(c, _)| c) != Some(200) {
            assert!(
                self.is_running(),
                "node {} exited; log:\n{}",
                self.id,
                tail(&self.log_text())
            );
            assert!(Instant::now() < deadline, "node {} not ready", self.id);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ProcCluster {
    /// A failed test keeps the node logs (the data directory goes away).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let keep = std::env::temp_dir().join(format!(
            "flotilla-failed-{}",
            self.dir.path().file_name().unwrap().to_string_lossy()
        ));
        if std::fs::create_dir_all(&keep).is_ok() {
            for n in &self.nodes {
                let _ = std::fs::copy(&n.log, keep.join(format!("node{}.log", n.id)));
            }
            // Logs of other processes the test ran (flotilla-bench...).
            for e in std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name();
                if name.to_string_lossy().ends_with(".log") {
                    let _ = std::fs::copy(e.path(), keep.join(&name));
                }
            }
            eprintln!("node logs kept in {}", keep.display());
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

pub struct ProcCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    /// The proxies between nodes, for clusters made by `with_net`.
    pub net: Option<std::sync::Arc<net::Net>>,
}

impl ProcCluster {
    /// Lays out `n` nodes with `shards` shards; `config` is the TOML of a
    /// config file every node uses (empty for defaults). Nodes are not
    /// started.
    pub fn new(n: usize, shards: usize, config: &str) -> Self {
        Self::build(n, shards, config, None)
    }

    /// Like `new`, with every node-to-node link going through a proxy of
    /// `net` (see `net`), so the test can cut links. Call inside a tokio
    /// runtime.
    pub fn with_net(n: usize, shards: usize, config: &str) -> Self {
        Self::build(n, shards, config, Some(net::Net::new()))
    }

    fn build(n: usize, shards: usize, config: &str, net: Option<std::sync::Arc<net::Net>>) -> Self {
        let mut dir = tempfile::tempdir().unwrap();
        // FLOTILLA_KEEP_TEST_DATA=1 keeps the nodes' data and logs for a
        // post-mortem.
        if std::env::var_os("FLOTILLA_KEEP_TEST_DATA").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping the cluster's data in {}", dir.path().display());
        }
        let cfg_path = dir.path().join("flotilla.toml");
        // A small reserve: test machines may have little free disk.
        let config = format!("[server]\nreserve-space-bytes = 16777216\n{config}");
        std::fs::write(&cfg_path, config).unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        // How node `me` reaches each node: directly, or through the proxy
        // of that link.
        let initial = |me: u64| {
            ports
                .iter()
                .enumerate()
                .map(|(i, (g, _))| {
                    let id = i as u64 + 1;
                    let real = format!("127.0.0.1:{g}");
                    let addr = match &net {
                        Some(net) if id != me => net.proxy((me, id), real),
                        _ => real,
                    };
                    format!("{id}={addr}")
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (g, s))| {
                let id = i as u64 + 1;
                let how = vec![
                    "--initial-cluster".into(),
                    initial(id),
                    "--initial-shards".into(),
                    shards.to_string(),
                ];
                Node::layout(dir.path(), id, (*g, *s), how)
            })
            .collect();
        ProcCluster { dir, nodes, net }
    }

    /// Lays out one more node, `--join`ing the cluster through its first
    /// node (not started); returns its index.
    pub fn add_joining_node(&mut self) -> usize {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let how = vec!["--join".into(), self.nodes[0].grpc.clone()];
        let node = Node::layout(self.dir.path(), id, (free_port(), free_port()), how);
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    pub fn start_all(&mut self) {
        for n in self.nodes.iter_mut() {
            n.start();
        }
        for n in self.nodes.iter_mut() {
            n.wait_ready(Duration::from_secs(60));
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.grpc.clone()).collect()
    }

    pub async fn client(&self, timeout: Duration) -> Client {
        Client::connect(ClientConfig {
            endpoints: self.endpoints(),
            timeout,
            ..Default::default()
        })
        .await
        .unwrap()
    }

    /// Panics with the log tail of any node that exited by itself.
    pub fn assert_all_running(&mut self) {
        for n in self.nodes.iter_mut() {
            if n.child.is_some() {
                assert!(
                    n.is_running(),
                    "node {} exited; log:\n{}",
                    n.id,
                    tail(&n.log_text())
                );
            }
        }
    }

    pub fn data_dir(&self, i: usize) -> &Path {
        &self.nodes[i].data
    }
}

/// Has every replica of every shard hash its data at one log index and
/// checks the hashes agree. All nodes must be up.
pub async fn assert_replicas_identical(cluster: &mut ProcCluster, client: &Client) {
    cluster.assert_all_running();
    let cluster = &*cluster;
    for shard in client.list_shards().await.unwrap() {
        let id = shard.descriptor.id;
        let holders: Vec<&Node> = cluster
            .nodes
            .iter()
            .filter(|n| shard.descriptor.replica_on(n.id).is_some())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        'retry: loop {
            assert!(
                Instant::now() < deadline,
                "shard {id}: replicas never hashed the same index"
            );
            // Ask each node; only the leader accepts.
            let mut index = None;
            for n in &holders {
                let Ok(mut admin) = AdminClient::connect(format!("http://{}", n.grpc)).await else {
                    continue;
                };
                if let Ok(r) = admin
                    .compute_hash(ComputeHashRequest { shard_id: id })
                    .await
                {
                    index = Some(r.into_inner().index);
                    break;
                }
            }
            let Some(index) = index else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let round = Instant::now() + Duration::from_secs(5);
            loop {
                let mut hashes = Vec::new();
                for n in &holders {
                    let mut admin = AdminClient::connect(format!("http://{}", n.grpc))
                        .await
                        .unwrap();
                    if let Ok(h) = admin.shard_hash(ShardHashRequest { shard_id: id }).await {
                        let h = h.into_inner();
                        if h.index == index {
                            hashes.push((n.id, h.hash, h.keys));
                        }
                    }
                }
                if hashes.len() == holders.len() {
                    let first = hashes[0];
                    for h in &hashes {
                        assert_eq!(
                            (h.1, h.2),
                            (first.1, first.2),
                            "shard {id}: replicas differ at index {index}: {hashes:?}"
                        );
                    }
                    break 'retry;
                }
                if Instant::now() > round {
                    continue 'retry;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
