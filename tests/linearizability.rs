//! `flotilla-bench check` against real server processes: concurrent
//! clients put, get and compare-and-swap a few keys while the node leading
//! the most shards is killed with SIGKILL and restarted; the recorded
//! history must be linearizable (flotilla-checker).

mod common;

use std::process::Command;
use std::time::Duration;

use common::ProcCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_stay_linearizable_across_a_leader_crash() {
    let mut cluster = ProcCluster::new(3, 4, "");
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;

    let bench = Command::new(env!("CARGO_BIN_EXE_flotilla-bench"))
        .args(["check", "--clients", "8", "--duration", "8", "--keys", "6"])
        .args(["--check-budget", "60", "--endpoints"])
        .arg(cluster.endpoints().join(","))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start flotilla-bench");

    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut busiest = (0, 0);
    for (i, n) in cluster.nodes.iter().enumerate() {
        let s = client.node_status(&n.grpc).await.unwrap();
        if s.leaders >= busiest.1 {
            busiest = (i, s.leaders);
        }
    }
    cluster.nodes[busiest.0].kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.nodes[busiest.0].start();

    let out = bench.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The run did real work.
    let ops = common::assert_linearizable(out.status, &stdout, &stderr);
    assert!(ops > 500, "only {ops} operations: {stdout}");
}
