//! Monitoring as an operator gets it: the alert rules pass their promtool
//! unit tests; the metrics of a live node pass `promtool check metrics`;
//! and a real Prometheus scraping a real 3-node cluster under load returns
//! data for every dashboard query and parses every alert expression.
//!
//! Needs `promtool` and `prometheus` (Debian package `prometheus`, which
//! `make test` installs).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, ProcCluster};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} not found: `make test` installs it (Debian package prometheus)"
    );
    Command::new(name)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let etc = repo().join("etc");
    run_ok(
        tool("promtool")
            .arg("check")
            .arg("config")
            .arg(etc.join("prometheus.yml")),
    );
    run_ok(
        tool("promtool")
            .arg("test")
            .arg("rules")
            .arg(etc.join("alerts_test.yml")),
    );
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET; returns the status code and the body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let out = String::from_utf8_lossy(&out).into_owned();
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second with the alert
    /// rules of `etc/alerts.yml`.
    fn start(dir: &Path, targets: &[String]) -> Prometheus {
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: flotilla\n    static_configs:\n      - targets: [{}]\n",
                repo().join("etc/alerts.yml").display(),
                targets.join(", ")
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = tool("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(&p.addr, "/-/ready").map(|(c, _)| c) != Some(200) {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// Runs an instant query; returns the result vector, or the error.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", encode(expr));
        let (_, body) = http_get(&self.addr, &path).ok_or("no answer from prometheus")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

/// Every PromQL expression of the dashboard, with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("grafana/dashboards/flotilla.json")).unwrap();
    let d: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            out.push((
                p["title"].as_str().unwrap().to_string(),
                expr.replace("$instance", ".*")
                    .replace("$__rate_interval", "1m"),
            ));
        }
    }
    out
}

/// Every alert expression of `etc/alerts.yml`, with its name. A small
/// reader for the file's fixed shape (`- alert: X` then `expr: ...`).
fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("etc/alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut name = None;
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("- alert: ") {
            name = Some(n.to_string());
        } else if let Some(e) = line.strip_prefix("expr: ") {
            out.push((name.take().expect("expr after alert"), e.to_string()));
        }
    }
    out
}

/// Problems `promtool check metrics` finds in `/metrics`, minus those in
/// raft-engine's own metrics (names that are not ours to change).
fn lint(metrics: &str) -> Vec<String> {
    let mut child = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("raft_engine_"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_every_dashboard_query_and_alert() {
    let mut cluster = ProcCluster::new(3, 4, common::SMALL_LOGS);
    cluster.start_all();
    let status: Vec<String> = cluster.nodes.iter().map(|n| n.status.clone()).collect();
    let prom = Prometheus::start(cluster.dir.path(), &status);

    // Load touching every request kind, the raft paths and log compaction.
    let client = cluster.client(Duration::from_secs(20)).await;
    // Refused input shows on the error panels. First, so its series has
    // been scraped several times (rate needs two samples) by the queries.
    assert!(client.put(Bytes::new(), Bytes::from("v")).await.is_err());
    let load_until = Instant::now() + Duration::from_secs(8);
    let mut i = 0u64;
    while Instant::now() < load_until {
        let key = Bytes::from(format!("{:02x}-key{i}", (i * 37) % 256));
        client.put(key.clone(), Bytes::from("v")).await.unwrap();
        client.get(key.clone()).await.unwrap();
        if i.is_multiple_of(10) {
            client
                .batch_put(vec![(key.clone(), Bytes::from("w"))])
                .await
                .unwrap();
            client.batch_get(vec![key.clone()]).await.unwrap();
            client.scan("", "", 10, false).await.unwrap();
            client
                .compare_and_swap(key.clone(), Some(Bytes::from("w")), Some(Bytes::from("x")))
                .await
                .unwrap();
            client.delete(key.clone()).await.unwrap();
            let end = Bytes::from([&key[..], &[0xff]].concat());
            client.delete_range(key.clone(), end).await.unwrap();
        }
        i += 1;
    }

    // The metrics of a live node pass the lint.
    let (code, metrics) = cluster.nodes[0].http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    let body = metrics.split_once("\r\n\r\n").unwrap().1;
    let problems = lint(body);
    assert!(
        problems.is_empty(),
        "promtool check metrics:\n{problems:#?}"
    );

    // Prometheus scraped every node several times and loaded the rules.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prom
            .query("count_over_time(up{job=\"flotilla\"}[1m]) >= 5")
            .unwrap();
        if up.len() == cluster.nodes.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus did not scrape: {up:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (_, rules) = http_get(&prom.addr, "/api/v1/rules").unwrap();
    let rules: Value = serde_json::from_str(&rules).unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), alert_exprs().len(), "{rules}");
    for r in &loaded {
        assert_eq!(r["health"], "ok", "{r}");
    }

    // Every dashboard query returns data; every alert expression parses
    // (and none fires on a healthy cluster).
    let mut empty = Vec::new();
    for (panel, expr) in dashboard_queries() {
        match prom.query(&expr) {
            Ok(r) if r.is_empty() => empty.push(format!("{panel}: {expr}")),
            Ok(_) => {}
            Err(e) => panic!("panel {panel:?}: {expr}: {e}"),
        }
    }
    assert!(empty.is_empty(), "queries without data:\n{empty:#?}");
    for (name, expr) in alert_exprs() {
        let r = prom
            .query(&expr)
            .unwrap_or_else(|e| panic!("alert {name}: {expr}: {e}"));
        assert!(
            r.is_empty(),
            "alert {name} fires on a healthy cluster: {r:?}"
        );
    }
}
