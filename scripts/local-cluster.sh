#!/usr/bin/env bash
# Starts, stops, grows, shrinks and shows a local Flotilla cluster on
# loopback.
#   scripts/local-cluster.sh start|stop|status|add|remove ID
# `start` bootstraps NODES nodes (default 3) the first time and restarts
# every node that has a data dir after that; `add` starts one more node
# that joins the cluster (the placement driver moves replicas to it);
# `remove ID` decommissions node ID, waits until its replicas moved away,
# then stops it. Node i (1-19) listens on 127.0.0.1:(20160+i) for gRPC and
# 127.0.0.1:(20180+i) for status; its data and log live in .flotilla/.
set -euo pipefail

# Why a node exited: its startup error (without a backtrace), else its log's tail.
exit_reason() {
  local err
  # (The error is at the log's end: the process exits right after it.)
  err=$(tail -n 200 "$1" | awk '/^Error: /{buf=""; on=1} on && /^(Stack backtrace:|  *0: )/{on=0} on{buf=buf $0 "\n"} END{printf "%s", buf}')
  if [ -n "$err" ]; then printf '%s\n' "$err" | head -n 12; else tail -n 20 "$1"; fi
}

cmd=${1:-status}
NODES=${NODES:-3}
BIN=${BIN:-bin}
DATA=${DATA:-.flotilla}
CONFIG=${CONFIG:-etc/flotilla.toml}

grpc_port() { echo $((20160 + $1)); }
status_port() { echo $((20180 + $1)); }
# Node $1's recorded process is alive and still a flotilla-server (after a
# crash or reboot its pid may belong to something else).
alive() {
  [ -f "$DATA/node$1.pid" ] || return 1
  local pid; pid=$(cat "$DATA/node$1.pid")
  kill -0 "$pid" 2>/dev/null && grep -qa flotilla-server "/proc/$pid/cmdline" 2>/dev/null
}
# Ids of nodes that have a data dir (or a pid file), ascending.
known_nodes() {
  ls -d "$DATA"/node* 2>/dev/null | sed -n 's|.*/node\([0-9]*\)\(\.pid\)\{0,1\}$|\1|p' | sort -n | uniq
}
running_endpoints() {
  local s=""
  for i in $(known_nodes); do
    alive "$i" && s="$s${s:+,}127.0.0.1:$(grpc_port "$i")"
  done
  echo "$s"
}
ctl() { "$BIN/flotilla-ctl" --endpoints "$(running_endpoints)" "$@"; }

# Starts node $1 with extra flags; logs to its file.
launch() {
  local i=$1; shift
  nohup "$BIN/flotilla-server" --config "$CONFIG" --node-id "$i" \
    --data-dir "$DATA/node$i" \
    --addr "127.0.0.1:$(grpc_port "$i")" --status-addr "127.0.0.1:$(status_port "$i")" \
    "$@" >>"$DATA/node$i.log" 2>&1 &
  echo $! >"$DATA/node$i.pid"
  echo "node $i started (pid $!), log $DATA/node$i.log"
}

# Waits until nodes $@ answer /ready.
wait_ready() {
  echo -n "waiting for every shard to elect a leader"
  for _ in $(seq 1 120); do
    local ready=1
    for i in "$@"; do
      # Only whether the process is gone: one just launched may not have
      # exec'd yet (its command line is still this script's), which `alive`
      # would take for a stale pid file.
      if ! kill -0 "$(cat "$DATA/node$i.pid")" 2>/dev/null; then
        echo; echo "node $i exited; from $DATA/node$i.log:"; exit_reason "$DATA/node$i.log"; exit 1
      fi
      curl -sf "http://127.0.0.1:$(status_port "$i")/ready" >/dev/null 2>&1 || ready=0
    done
    if [ $ready -eq 1 ]; then echo " ready."; return 0; fi
    echo -n "."
    sleep 0.5
  done
  echo; echo "not ready in 60s; see $DATA/node*.log"; exit 1
}

initial_cluster() {
  local s=""
  for i in $(seq 1 "$NODES"); do
    s="$s${s:+,}$i=127.0.0.1:$(grpc_port "$i")"
  done
  echo "$s"
}

start() {
  mkdir -p "$DATA"
  local ic nodes
  ic=$(initial_cluster)
  nodes=$(ls -d "$DATA"/node*/ >/dev/null 2>&1 && known_nodes || seq 1 "$NODES")
  for i in $nodes; do
    if alive "$i"; then
      echo "node $i already running (pid $(cat "$DATA/node$i.pid"))"
      continue
    fi
    # --initial-cluster only matters the first time (a new data dir).
    launch "$i" --initial-cluster "$ic"
  done
  # shellcheck disable=SC2086
  wait_ready $nodes
  local first last
  first=$(echo "$nodes" | head -n1); last=$(echo "$nodes" | tail -n1)
  cat <<USAGE

Flotilla is running: $(echo "$nodes" | wc -w) nodes on 127.0.0.1:$(grpc_port "$first")-$(grpc_port "$last") (gRPC),
status and metrics on http://127.0.0.1:$(status_port "$first")/metrics ... :$(status_port "$last").

  $BIN/flotilla-ctl put hello world
  $BIN/flotilla-ctl get hello
  $BIN/flotilla-ctl scan
  $BIN/flotilla-ctl cluster status
  $BIN/flotilla-ctl shard list
  $BIN/flotilla-ctl node list
  make bench            # load it
  make node-add         # one more node; replicas move to it
  make node-remove ID=N # decommission node N, then stop it
  make status           # nodes and shards
  make stop             # stop it (data stays in $DATA/; make clean-data wipes it)
USAGE
}

add() {
  local last id joined
  # Past every id ever used here: a removed node's id never serves again.
  last=$(ls -d "$DATA"/node* "$DATA"/removed-node* 2>/dev/null \
    | sed -n 's|.*node\([0-9]*\)\(\.pid\|\.log\)\{0,1\}$|\1|p' | sort -n | tail -n1)
  id=$(( ${last:-0} + 1 ))
  if [ "$id" -gt 19 ]; then echo "node ids above 19 would collide with other ports"; exit 1; fi
  joined=$(running_endpoints)
  if [ -z "$joined" ]; then echo "no node is running; make run first"; exit 1; fi
  launch "$id" --join "$joined"
  wait_ready "$id"
  echo "node $id joined; watch replicas move to it with: $BIN/flotilla-ctl node list"
}

remove() {
  local id=${1:?usage: $0 remove ID}
  alive "$id" || { echo "node $id is not running"; exit 1; }
  ctl node decommission "$id"
  echo -n "waiting for node $id's replicas to move away"
  for _ in $(seq 1 1200); do
    if grep -q "\"id\":$id,[^}]*\"state\":\"removed\"" <<<"$(ctl -o json node list 2>/dev/null)"; then
      echo " done."
      kill "$(cat "$DATA/node$id.pid")"
      for _ in $(seq 1 100); do alive "$id" || break; sleep 0.1; done
      alive "$id" && kill -9 "$(cat "$DATA/node$id.pid")"
      rm -f "$DATA/node$id.pid"
      # Out of the way of `start`; the id may never serve again anyway.
      mv "$DATA/node$id" "$DATA/removed-node$id"
      mv "$DATA/node$id.log" "$DATA/removed-node$id.log" 2>/dev/null || true
      echo "node $id removed and stopped (its old data: $DATA/removed-node$id)"
      return 0
    fi
    echo -n "."
    sleep 1
  done
  echo; echo "node $id still holds replicas after 20 minutes; see: $BIN/flotilla-ctl operator list"; exit 1
}

stop() {
  for i in $(known_nodes); do
    if alive "$i"; then
      kill "$(cat "$DATA/node$i.pid")"
      echo "node $i stopping"
    fi
  done
  for i in $(known_nodes); do
    for _ in $(seq 1 100); do alive "$i" || break; sleep 0.1; done
    if alive "$i"; then kill -9 "$(cat "$DATA/node$i.pid")"; fi
    rm -f "$DATA/node$i.pid"
  done
  echo "stopped"
}

status() {
  for i in $(known_nodes); do
    if alive "$i"; then
      echo "node $i: running (pid $(cat "$DATA/node$i.pid"))"
    else
      echo "node $i: stopped"
    fi
  done
  if ctl --timeout 3 cluster status 2>/dev/null; then
    ctl --timeout 3 node list
    ctl --timeout 3 shard list
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  add) add ;;
  remove) remove "${2:-}" ;;
  *) echo "usage: $0 start|stop|status|add|remove ID"; exit 2 ;;
esac
