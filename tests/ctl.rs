//! `flotilla-ctl` as an operator uses it, against real `flotilla-server`
//! processes: data commands and views, a shard split, and moving a replica
//! from one node to another (add, hand over leadership, remove) with
//! nothing lost.

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::ProcCluster;
use serde_json::Value;

/// Runs the ctl against the cluster; returns (success, stdout, stderr).
fn ctl(cluster: &ProcCluster, args: &[&str]) -> (bool, String, String) {
    eprintln!("ctl {args:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-ctl"))
        .arg("--endpoints")
        .arg(cluster.endpoints().join(","))
        .arg("--timeout")
        .arg("30")
        .args(args)
        .output()
        .expect("run flotilla-ctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ctl_ok(cluster: &ProcCluster, args: &[&str]) -> String {
    let (ok, out, err) = ctl(cluster, args);
    assert!(ok, "flotilla-ctl {args:?} failed: {err}");
    out
}

fn ctl_json(cluster: &ProcCluster, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = ctl_ok(cluster, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Shard `id` in `shard list -o json`.
fn shard(cluster: &ProcCluster, id: u64) -> Value {
    let list = ctl_json(cluster, &["shard", "list"]);
    list.as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("shard {id} missing from {list}"))
}

fn nodes_of(shard: &Value) -> Vec<u64> {
    let mut v: Vec<u64> = shard["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node_id"].as_u64().unwrap())
        .collect();
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_commands_and_views() {
    let mut cluster = ProcCluster::new(3, 4, "");
    cluster.start_all();

    assert_eq!(ctl_ok(&cluster, &["put", "hello", "world"]).trim(), "OK");
    assert_eq!(ctl_ok(&cluster, &["get", "hello"]).trim(), "world");
    let (found, _, err) = ctl(&cluster, &["get", "nothing-here"]);
    assert!(!found && err.contains("not found"), "{err}");

    // Compare-and-swap succeeds once, then sees the new value.
    ctl_ok(
        &cluster,
        &["cas", "counter", "--expect-absent", "--new", "1"],
    );
    let (_, _, _) = ctl(
        &cluster,
        &["cas", "counter", "--expect-absent", "--new", "2"],
    );
    assert_eq!(ctl_ok(&cluster, &["get", "counter"]).trim(), "1");

    // A scan across every shard (split at 0x40, 0x80, 0xc0) comes back
    // in key order; binary keys go in and come out as hex.
    for k in ["a", "m", "z"] {
        ctl_ok(&cluster, &["put", k, "v"]);
    }
    for k in ["10", "9000", "c0ff"] {
        ctl_ok(&cluster, &["--hex", "put", k, "00"]);
    }
    let scan = ctl_json(&cluster, &["scan"]);
    let keys: Vec<&str> = scan
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["0x10", "a", "counter", "hello", "m", "z", "0x9000", "0xc0ff"]
    );

    ctl_ok(&cluster, &["delete", "hello"]);
    assert!(!ctl(&cluster, &["get", "hello"]).0);

    // Bad input: a clear error, nothing written.
    let (ok, _, err) = ctl(&cluster, &["put", "", "x"]);
    assert!(!ok && err.contains("key"), "{err}");

    // Split shard 2 [0x40, 0x80) at "n": the new shard takes [n, 0x80) and
    // every key is still where a scan finds it.
    let split = ctl_json(&cluster, &["shard", "split", "2", "--key", "n"]);
    assert_eq!(split["left"]["id"], 2, "{split}");
    assert_eq!(split["left"]["end_key"], "n", "{split}");
    assert_eq!(split["right"]["start_key"], "n", "{split}");
    assert_eq!(split["right"]["end_key"], "0x80", "{split}");
    assert_eq!(split["right"]["version"], 2, "{split}");
    let new_id = split["right"]["id"].as_u64().unwrap();
    assert_eq!(shard(&cluster, new_id)["start_key"], "n");
    assert_eq!(ctl_ok(&cluster, &["get", "z"]).trim(), "v");
    assert_eq!(ctl_json(&cluster, &["scan"]).as_array().unwrap().len(), 7);
    // A key at the shard's start or outside it, or none, is refused clearly.
    let (ok, _, err) = ctl(&cluster, &["shard", "split", "2", "--key", "@"]);
    assert!(!ok && err.contains("not strictly inside"), "{err}");
    let (ok, _, err) = ctl(&cluster, &["shard", "split", "2", "--key", "z"]);
    assert!(!ok && err.contains("not strictly inside"), "{err}");
    let (ok, _, err) = ctl(&cluster, &["shard", "split", "2", "--key", ""]);
    assert!(!ok && err.contains("split_key"), "{err}");

    // The node registry lists the three nodes, up; the placement driver
    // answers (it has nothing to do on a balanced cluster).
    let nodes = ctl_json(&cluster, &["node", "list"]);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    assert!(nodes.iter().all(|n| n["state"] == "up"), "{nodes:?}");
    ctl_json(&cluster, &["operator", "list"]);
    // Decommissioning an unknown node is refused clearly.
    let (ok, _, err) = ctl(&cluster, &["node", "decommission", "9"]);
    assert!(!ok && err.contains("no node 9"), "{err}");

    let status = ctl_json(&cluster, &["cluster", "status"]);
    assert_eq!(status["shards"], 5);
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3);
    let table = ctl_ok(&cluster, &["shard", "list"]);
    assert!(table.contains("LEADER"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moves_to_another_node() {
    // One shard on nodes 1-3; node 4 starts empty.
    let mut cluster = ProcCluster::new(4, 1, common::SMALL_LOGS);
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(30)).await;
    let pairs: Vec<(Bytes, Bytes)> = (0..500u32)
        .map(|i| {
            (
                Bytes::from(format!("key{i:04}")),
                Bytes::from(format!("value{i}")),
            )
        })
        .collect();
    for chunk in pairs.chunks(50) {
        client.batch_put(chunk.to_vec()).await.unwrap();
    }
    assert_eq!(nodes_of(&shard(&cluster, 1)), vec![1, 2, 3]);

    // Add a voter on node 4: it joins as a learner, catches up, is promoted.
    let added = ctl_json(&cluster, &["shard", "add-replica", "1", "--node", "4"]);
    let on4 = added["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node_id"] == 4)
        .cloned()
        .unwrap_or_else(|| panic!("{added}"));
    assert_eq!(on4["role"], "VOTER", "{added}");

    // Leadership moves to node 4, then node 1's replica goes away.
    let out = ctl_ok(&cluster, &["shard", "transfer-leader", "1", "--node", "4"]);
    assert!(out.contains("led by node 4"), "{out}");
    assert_eq!(shard(&cluster, 1)["leader_node"], 4);
    let removed = ctl_json(&cluster, &["shard", "remove-replica", "1", "--node", "1"]);
    assert_eq!(nodes_of(&removed), vec![2, 3, 4], "{removed}");

    // Removing the same replica again is refused with a clear error.
    let (ok, _, err) = ctl(&cluster, &["shard", "remove-replica", "1", "--node", "1"]);
    assert!(!ok && err.contains("no replica"), "{err}");

    // Node 1 let go of the shard (it keeps its meta shard replica); every
    // write is still there.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = client.node_status(&cluster.nodes[0].grpc).await.unwrap();
        if s.replicas == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 1 kept its replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = client.scan("", "", 10_000, false).await.unwrap();
    assert_eq!(got.len(), pairs.len());
    for (p, (k, v)) in got.iter().zip(&pairs) {
        assert_eq!((&p.key, &p.value), (k, v));
    }
    let table = ctl_ok(&cluster, &["shard", "describe", "1"]);
    assert!(table.contains("n4") && !table.contains("n1 "), "{table}");
}
