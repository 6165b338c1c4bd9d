//! End to end with real `flotilla-server` processes on free loopback ports:
//! the node leading the most shards is killed with SIGKILL while a client
//! writes; writes go on; the node restarts on its data; every acknowledged
//! write is read back.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_client::{Client, ClientConfig};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    id: u64,
    grpc: String,
    status: String,
    data: PathBuf,
    initial: String,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self, log_dir: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("node{}.log", self.id)))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla-server"))
            .args(["--node-id", &self.id.to_string()])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--addr", &self.grpc, "--status-addr", &self.status])
            .args(["--initial-cluster", &self.initial, "--initial-shards", "8"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn flotilla-server");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(&self.status).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, out))
    }

    fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.http_get("/ready").map(|(c, _)| c) != Some(200) {
            assert!(Instant::now() < deadline, "node {} not ready", self.id);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_the_busiest_leader_under_writes_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (g, _))| format!("{}=127.0.0.1:{g}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<Node> = ports
        .iter()
        .enumerate()
        .map(|(i, (g, s))| Node {
            id: i as u64 + 1,
            grpc: format!("127.0.0.1:{g}"),
            status: format!("127.0.0.1:{s}"),
            data: dir.path().join(format!("node{}", i + 1)),
            initial: initial.clone(),
            child: None,
        })
        .collect();
    for n in nodes.iter_mut() {
        n.start(dir.path());
    }
    for n in &nodes {
        n.wait_ready(Duration::from_secs(60));
    }

    let client = Client::connect(ClientConfig {
        endpoints: nodes.iter().map(|n| n.grpc.clone()).collect(),
        timeout: Duration::from_secs(20),
        ..Default::default()
    })
    .await
    .unwrap();

    let acked: Arc<Mutex<Vec<(Bytes, Bytes)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let client = client.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Keys spread over every shard.
                let n = (w << 32) | i;
                let key = Bytes::copy_from_slice(&n.wrapping_mul(0x9e3779b97f4a7c15).to_be_bytes());
                let value = Bytes::from(format!("w{w}-{i}"));
                if client.put(key.clone(), value.clone()).await.is_ok() {
                    acked.lock().unwrap().push((key, value));
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Kill -9 the node that leads the most shards.
    let mut busiest = (0, 0);
    for (i, n) in nodes.iter().enumerate() {
        let s = client.node_status(&n.grpc).await.unwrap();
        if s.leaders >= busiest.1 {
            busiest = (i, s.leaders);
        }
    }
    let victim = busiest.0;
    let before_kill = acked.lock().unwrap().len();
    assert!(before_kill > 0, "no write acknowledged before the kill");
    nodes[victim].kill9();

    // Writes go on without the victim.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = acked.lock().unwrap().len();
        if now > before_kill + 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes stalled after the kill ({now} acked)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The victim comes back on its data and catches up.
    nodes[victim].start(dir.path());
    nodes[victim].wait_ready(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > before_kill + 200);
    let keys: Vec<Bytes> = acked.iter().map(|(k, _)| k.clone()).collect();
    let mut found = std::collections::HashMap::new();
    for chunk in keys.chunks(500) {
        for p in client.batch_get(chunk.to_vec()).await.unwrap() {
            found.insert(p.key, p.value);
        }
    }
    for (k, v) in &acked {
        assert_eq!(found.get(k), Some(v), "acknowledged write {k:?} lost");
    }

    // The restarted node hosts all its replicas again and exports metrics.
    let s = client.node_status(&nodes[victim].grpc).await.unwrap();
    assert_eq!(s.replicas, 8);
    let (code, body) = nodes[victim].http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("flotilla_raft_log_writes_total"));
    assert!(body.contains("raft_engine_sync_log_duration_seconds"));
}
