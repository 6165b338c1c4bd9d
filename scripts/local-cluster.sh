#!/usr/bin/env bash
# Starts, stops and shows a local Flotilla cluster on loopback.
#   scripts/local-cluster.sh start|stop|status
# Node i (1-based) listens on 127.0.0.1:(20160+i) for gRPC and
# 127.0.0.1:(20180+i) for status; its data and log live in .flotilla/.
set -euo pipefail

cmd=${1:-status}
NODES=${NODES:-3}
BIN=${BIN:-bin}
DATA=${DATA:-.flotilla}
CONFIG=${CONFIG:-etc/flotilla.toml}

grpc_port() { echo $((20160 + $1)); }
status_port() { echo $((20180 + $1)); }
alive() { [ -f "$DATA/node$1.pid" ] && kill -0 "$(cat "$DATA/node$1.pid")" 2>/dev/null; }

initial_cluster() {
  local s=""
  for i in $(seq 1 "$NODES"); do
    s="$s${s:+,}$i=127.0.0.1:$(grpc_port "$i")"
  done
  echo "$s"
}

start() {
  mkdir -p "$DATA"
  local ic
  ic=$(initial_cluster)
  for i in $(seq 1 "$NODES"); do
    if alive "$i"; then
      echo "node $i already running (pid $(cat "$DATA/node$i.pid"))"
      continue
    fi
    nohup "$BIN/flotilla-server" --config "$CONFIG" --node-id "$i" \
      --data-dir "$DATA/node$i" \
      --addr "127.0.0.1:$(grpc_port "$i")" --status-addr "127.0.0.1:$(status_port "$i")" \
      --initial-cluster "$ic" >>"$DATA/node$i.log" 2>&1 &
    echo $! >"$DATA/node$i.pid"
    echo "node $i started (pid $!), log $DATA/node$i.log"
  done
  echo -n "waiting for every shard to elect a leader"
  for _ in $(seq 1 120); do
    local ready=1
    for i in $(seq 1 "$NODES"); do
      if ! alive "$i"; then
        echo; echo "node $i exited; last lines of $DATA/node$i.log:"; tail -n 20 "$DATA/node$i.log"; exit 1
      fi
      curl -sf "http://127.0.0.1:$(status_port "$i")/ready" >/dev/null 2>&1 || ready=0
    done
    if [ $ready -eq 1 ]; then
      echo " ready."
      cat <<USAGE

Flotilla is running: $NODES nodes on 127.0.0.1:$(grpc_port 1)-$(grpc_port "$NODES") (gRPC),
status and metrics on http://127.0.0.1:$(status_port 1)/metrics ... :$(status_port "$NODES").

  $BIN/flotilla-ctl put hello world
  $BIN/flotilla-ctl get hello
  $BIN/flotilla-ctl scan
  $BIN/flotilla-ctl cluster status
  $BIN/flotilla-ctl shard list
  make bench      # load it
  make status     # nodes and shards
  make stop       # stop it (data stays in $DATA/; make clean-data wipes it)
USAGE
      return 0
    fi
    echo -n "."
    sleep 0.5
  done
  echo; echo "the cluster did not become ready in 60s; see $DATA/node*.log"; exit 1
}

stop() {
  for i in $(seq 1 "$NODES"); do
    if alive "$i"; then
      kill "$(cat "$DATA/node$i.pid")"
      echo "node $i stopping"
    fi
  done
  for i in $(seq 1 "$NODES"); do
    for _ in $(seq 1 100); do alive "$i" || break; sleep 0.1; done
    if alive "$i"; then kill -9 "$(cat "$DATA/node$i.pid")"; fi
    rm -f "$DATA/node$i.pid"
  done
  echo "stopped"
}

status() {
  for i in $(seq 1 "$NODES"); do
    if alive "$i"; then
      echo "node $i: running (pid $(cat "$DATA/node$i.pid"))"
    else
      echo "node $i: stopped"
    fi
  done
  if "$BIN/flotilla-ctl" --timeout 3 cluster status 2>/dev/null; then
    "$BIN/flotilla-ctl" --timeout 3 shard list
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status"; exit 2 ;;
esac
