#!/usr/bin/env bash
# Flotilla and etcd side by side on this machine: a 3-member etcd on
# loopback (Debian's etcd-server, default durability: fsync on) and the
# 3-node Flotilla cluster of `make run`, driven by flotilla-bench with the
# same workloads, 128-byte values, at 16, 64 and 256 clients:
#   write-heavy: put (100 % writes)      read-heavy: ycsb-b (95 % reads)
# Prints one table: ops/s, p50, p99, p99.9 of each, and Flotilla/etcd.
#   BENCH_SECS (default 15) per run; BENCH_KEYS (default 20000) records.
set -euo pipefail

BIN=${BIN:-bin}
SECS=${BENCH_SECS:-15}
KEYS=${BENCH_KEYS:-20000}
OUT=${OUT:-.flotilla-bench}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"

ETCD_EPS="127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
FLOTILLA_EPS="127.0.0.1:20161,127.0.0.1:20162,127.0.0.1:20163"

start_etcd() {
  local cluster="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
  for i in 1 2 3; do
    rm -rf "$OUT/etcd$i"
    nohup etcd --name "e$i" --data-dir "$OUT/etcd$i" \
      --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
      --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
      --initial-cluster "$cluster" --initial-cluster-state new \
      --initial-cluster-token flotilla-bench >"$OUT/etcd$i.log" 2>&1 &
    echo $! >"$OUT/etcd$i.pid"
  done
  echo -n "waiting for etcd"
  for _ in $(seq 1 60); do
    if grep -q true <<<"$(curl -sf http://127.0.0.1:23791/health)"; then echo " up."; return 0; fi
    echo -n "."; sleep 0.5
  done
  echo; echo "etcd did not start; see $OUT/etcd*.log"; exit 1
}

stop_etcd() {
  local pids=() i p alive
  for i in 1 2 3; do
    if [ -f "$OUT/etcd$i.pid" ]; then
      pids+=("$(cat "$OUT/etcd$i.pid")")
      kill "${pids[-1]}" 2>/dev/null || true
    fi
    rm -f "$OUT/etcd$i.pid"
  done
  # Wait until they exited (up to 10 s): a run started right after this one
  # must find the ports and data directories free.
  for _ in $(seq 1 100); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
}
trap stop_etcd EXIT

run() { # target endpoints workload clients [extra flags]; DUR overrides BENCH_SECS
  local target=$1 eps=$2 workload=$3 clients=$4; shift 4
  echo "  $target $workload, $clients clients" >&2
  "$BIN/flotilla-bench" "$workload" --target "$target" --endpoints "$eps" \
    --clients "$clients" --duration "${DUR:-$SECS}" --value-size 128 --keys "$KEYS" -o json "$@" \
    2>>"$OUT/bench.log" >>"$RESULTS"
}

start_etcd
if ! scripts/local-cluster.sh start >"$OUT/cluster-start.log" 2>&1; then
  cat "$OUT/cluster-start.log"
  echo "the Flotilla cluster did not start (is something else on ports 20161-20163?)"
  exit 1
fi
echo "loading $KEYS records into each"
DUR=1 run flotilla "$FLOTILLA_EPS" ycsb-c 1 --load --operations 1
DUR=1 run etcd "$ETCD_EPS" ycsb-c 1 --load --operations 1
: >"$RESULTS"
for workload in put ycsb-b; do
  for clients in 16 64 256; do
    run flotilla "$FLOTILLA_EPS" "$workload" "$clients" \
      --metrics-endpoints 127.0.0.1:20181,127.0.0.1:20182,127.0.0.1:20183
    run etcd "$ETCD_EPS" "$workload" "$clients"
  done
done

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def key(r): return (r["workload"], r["clients"])
by = {}
for r in rows:
    total = sum(o["ops_per_sec"] for o in r["ops"])
    errors = sum(o["errors"] for o in r["ops"])
    # The latency of the workload's main operation: writes for put, reads
    # for ycsb-b.
    main = r["ops"][0] if r["workload"] == "put" else next(o for o in r["ops"] if o["op"] == "read")
    by.setdefault(key(r), {})[r["target"]] = (total, main, errors, r.get("raft_engine_fsyncs_per_write"))
print(f'{"workload":<10}{"clients":>8} | {"system":<9}{"ops/s":>10}{"p50 ms":>9}{"p99 ms":>9}{"p99.9 ms":>10}{"errors":>8} | flotilla/etcd')
print("-" * 98)
for (w, c), t in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    f, e = t.get("flotilla"), t.get("etcd")
    for name, v in (("flotilla", f), ("etcd", e)):
        if v is None: continue
        total, m, errors, fsyncs = v
        ratio = ""
        if name == "flotilla" and e and e[0] > 0:
            ratio = f'{total / e[0]:.2f}x ops/s, p99 {m["p99_ms"] / max(e[1]["p99_ms"], 1e-9):.2f}x'
            if fsyncs is not None and w == "put":
                ratio += f', {fsyncs:.3f} fsyncs/write'
        label = "write" if w == "put" else "read-95%"
        print(f'{label if name == "flotilla" else "":<10}{c if name == "flotilla" else "":>8} | {name:<9}{total:>10.0f}{m["p50_ms"]:>9.2f}{m["p99_ms"]:>9.2f}{m["p999_ms"]:>10.2f}{errors:>8} | {ratio}')
PY
echo "raw results: $RESULTS; the Flotilla cluster keeps running (make stop)"
