#!/usr/bin/env bash
# Many shards on one machine: starts a fresh 3-node cluster on loopback
# with SHARDS shards (default 10,000, so 30,000 replicas), and measures
# what hosting them costs and how fast they answer again:
#   1. time to ready, and until every replica sleeps (hibernates);
#   2. idle CPU of the three nodes together over IDLE_SECS seconds (CPU
#      time of every thread, from /proc/<pid>/task/*/schedstat), and RSS;
#   3. `flotilla-bench wake`: one put to each of WAKE_SHARDS sleeping
#      shards, one at a time;
#   4. `flotilla-bench failover`: kill -9 of the node leading the most
#      shards, then one put to each of FAILOVER_SHARDS of its shards; and,
#      from the nodes' logs, how many shards needed more than one election;
#   5. restart of the killed node RESTART_AFTER (10) seconds after the
#      kill: time until it answers /ready;
#   6. kill -9 of all three nodes at once, then all three started again:
#      time until every one answers /ready.
# The nodes use etc/flotilla.toml (CONFIG) with --initial-shards, ports
# BASE_PORT+1..3 (gRPC) and BASE_PORT+21..23 (status), and a fresh data
# dir that is removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."

SHARDS=${SHARDS:-10000}
IDLE_SECS=${IDLE_SECS:-30}
WAKE_SHARDS=${WAKE_SHARDS:-200}
FAILOVER_SHARDS=${FAILOVER_SHARDS:-200}
RESTART_AFTER=${RESTART_AFTER:-10}
BASE_PORT=${BASE_PORT:-20260}
BIN=${BIN:-bin}
CONFIG=${CONFIG:-etc/flotilla.toml}
DATA=$(mktemp -d "${TMPDIR:-/var/tmp}/flotilla-scale.XXXXXX")
NODES="1 2 3"
declare -A PID

grpc_port() { echo $((BASE_PORT + $1)); }
status_port() { echo $((BASE_PORT + 20 + $1)); }
endpoints() {
  local s=""
  for i in $NODES; do s="$s${s:+,}127.0.0.1:$(grpc_port "$i")"; done
  echo "$s"
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# kill -9 of every node started, and a wait (at most 5 s each) until they
# are gone and their ports free.
kill_all() {
  for i in $NODES; do
    [ -n "${PID[$i]:-}" ] && kill -9 "${PID[$i]}" 2>/dev/null || true
  done
  for i in $NODES; do
    for _ in $(seq 1 100); do
      kill -0 "${PID[$i]:-0}" 2>/dev/null || break
      sleep 0.05
    done
  done
}

cleanup() {
  kill_all
  if [ "${KEEP:-0}" = 1 ]; then echo "data kept in $DATA"; else rm -rf "$DATA"; fi
}
trap cleanup EXIT

for i in $NODES; do
  for p in $(grpc_port "$i") $(status_port "$i"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "port $p is in use; pick other ports with BASE_PORT=..."; exit 1
    fi
  done
done

launch() {
  local i=$1
  "$BIN/flotilla-server" --config "$CONFIG" --node-id "$i" --data-dir "$DATA/node$i" \
    --addr "127.0.0.1:$(grpc_port "$i")" --status-addr "127.0.0.1:$(status_port "$i")" \
    --initial-cluster "1=127.0.0.1:$(grpc_port 1),2=127.0.0.1:$(grpc_port 2),3=127.0.0.1:$(grpc_port 3)" \
    --initial-shards "$SHARDS" >>"$DATA/node$i.log" 2>&1 &
  PID[$i]=$!
  # Not a job: the shell reaps it without a "Killed" line after kill -9.
  disown
}

# Waits until nodes $@ answer /ready (at most 120 s).
wait_ready() {
  for _ in $(seq 1 1200); do
    local ready=1
    for i in "$@"; do
      kill -0 "${PID[$i]}" 2>/dev/null || { echo "node $i exited; see $DATA/node$i.log"; tail -5 "$DATA/node$i.log"; exit 1; }
      curl -sf "http://127.0.0.1:$(status_port "$i")/ready" >/dev/null 2>&1 || ready=0
    done
    [ $ready = 1 ] && return 0
    sleep 0.1
  done
  echo "not ready in 120 s; see $DATA/node*.log"; exit 1
}

# Node $1's value of the unlabeled metric $2 (0 if it has none).
metric() {
  local v
  v=$(curl -sf "http://127.0.0.1:$(status_port "$1")/metrics" | awk -v m="$2" '$1 == m {print $2}')
  echo "${v:-0}"
}

# Sum of a gauge over the running nodes.
gauge() {
  local sum=0
  for i in $NODES; do
    kill -0 "${PID[$i]}" 2>/dev/null || continue
    sum=$((sum + $(metric "$i" "$1")))
  done
  echo "$sum"
}

# Waits until every replica on the running nodes sleeps (at most 180 s).
wait_asleep() {
  for _ in $(seq 1 1800); do
    local all asleep
    all=$(gauge flotilla_shards); asleep=$(gauge flotilla_replicas_hibernated)
    [ "$all" -gt 0 ] && [ "$asleep" -ge "$all" ] && return 0
    sleep 0.1
  done
  echo "replicas still awake after 180 s: $(gauge flotilla_replicas_hibernated) of $(gauge flotilla_shards) asleep"; exit 1
}

# CPU time of every thread of the nodes, in nanoseconds.
cpu_ns() {
  local sum=0 t
  for i in $NODES; do
    for t in /proc/"${PID[$i]}"/task/*/schedstat; do
      sum=$((sum + $(cut -d' ' -f1 "$t" 2>/dev/null || echo 0)))
    done
  done
  echo "$sum"
}

tick_ms=$(awk -F'= *' '/^tick-interval-ms/ {print $2}' "$CONFIG")
election_ticks=$(awk -F'= *' '/^election-ticks/ {print $2}' "$CONFIG")
election_ms=$((tick_ms * election_ticks))

echo "== $SHARDS shards on 3 nodes ($CONFIG, election timeout $election_ms ms), data in $DATA"
t0=$(now)
for i in $NODES; do launch "$i"; done
wait_ready 1 2 3
ready_s=$(since "$t0")
t1=$(now)
wait_asleep
asleep_s=$(since "$t1")
echo "ready in $ready_s s; every replica asleep $asleep_s s later"

sleep 5
c0=$(cpu_ns); w0=$(now)
sleep "$IDLE_SECS"
c1=$(cpu_ns); w1=$(now)
idle_pct=$(awk -v c="$((c1 - c0))" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.2f", c / ((b - a) * 1e7) }')
rss=""
for i in $NODES; do
  rss="$rss $(awk '/^VmRSS/ {printf "%d", $2/1024}' "/proc/${PID[$i]}/status")"
done
echo "idle CPU of the 3 nodes over $IDLE_SECS s: $idle_pct % of one core; RSS MiB:$rss"

echo "== wake: one put to each of $WAKE_SHARDS sleeping shards, one at a time"
"$BIN/flotilla-bench" wake --endpoints "$(endpoints)" --shards "$WAKE_SHARDS" --clients 1

wait_asleep
victim=1 most=0
for i in $NODES; do
  l=$(metric "$i" flotilla_leaders)
  if [ "$l" -gt "$most" ]; then victim=$i most=$l; fi
done
echo "== failover: kill -9 node $victim (leads $most shards), then one put to each of $FAILOVER_SHARDS of them"
killed_at_s=$(now)
killed_at=$(date -u -d "@$killed_at_s" +%Y-%m-%dT%H:%M:%S.%6N)
"$BIN/flotilla-bench" failover --endpoints "$(endpoints)" --shards "$FAILOVER_SHARDS" \
  --kill-node "$victim" --kill-pid "${PID[$victim]}" --duration 30
while kill -0 "${PID[$victim]}" 2>/dev/null; do sleep 0.1; done
# Elections since the kill, from the survivors' "became leader" log lines
# (info level): a shard whose new term is more than one past its last
# leader's needed more than one election (a failed or split vote).
sleep 2
elections=$(cat "$DATA"/node*.log | grep -h "became leader" | sort | python3 -c '
import re, sys
since = sys.argv[1]
before, after = {}, {}
for line in sys.stdin:
    shard = int(re.search(r"shard_id=(\d+)", line).group(1))
    term = int(re.search(r"term=(\d+)", line).group(1))
    if line[:26] < since:
        before[shard] = term
    elif shard not in after:
        after[shard] = term
again = sorted(s for s, t in after.items() if s in before and t > before[s] + 1)
print(f"{len(after)} shards elected a leader after the kill; {len(again)} needed more than one election {again[:10] if again else str()}")
' "$killed_at")
echo "$elections"

# Down for RESTART_AFTER seconds in all (from the kill), then restarted.
sleep "$(awk -v a="$killed_at_s" -v b="$(now)" -v d="$RESTART_AFTER" 'BEGIN { w = a + d - b; print (w > 0 ? w : 0) }')"
t2=$(now)
launch "$victim"
wait_ready "$victim"
restart_s=$(since "$t2")
echo "node $victim restarted ${RESTART_AFTER} s after kill -9: ready in $restart_s s"

echo "== cluster restart: kill -9 of all three nodes, then all three started again"
kill_all
t3=$(now)
for i in $NODES; do launch "$i"; done
wait_ready 1 2 3
cluster_restart_s=$(since "$t3")
echo "all three nodes ready in $cluster_restart_s s"

cat <<SUMMARY

== summary ($SHARDS shards, $((SHARDS * 3)) replicas; targets for 10,000 shards in brackets)
fresh cluster ready      $ready_s s, all replicas asleep $asleep_s s later
idle CPU, 3 nodes        $idle_pct % of one core  [< 5 %]
RSS per node (MiB)      $rss  [< 1024]
wake put                 see the wake table  [max < 2 election timeouts = $((2 * election_ms)) ms]
failover put             see the failover table  [max < 2 election timeouts = $((2 * election_ms)) ms]
failover elections       $elections
restart to ready         $restart_s s  [< 5 s]
cluster restart to ready $cluster_restart_s s
SUMMARY
