#!/usr/bin/env bash
# Starts or stops Prometheus (and Grafana, when installed) watching the
# `make run` cluster.
#   scripts/monitor.sh start|stop
# Prometheus: 127.0.0.1:9090 with etc/prometheus.yml (alert rules from
# etc/alerts.yml), data under .flotilla/prometheus. Grafana: 127.0.0.1:3000
# with grafana/provisioning (data source and dashboard), data under
# .flotilla/grafana.
set -euo pipefail

cmd=${1:-start}
DATA=${DATA:-.flotilla}
PROM_ADDR=${PROM_ADDR:-127.0.0.1:9090}
GRAFANA_PORT=${GRAFANA_PORT:-3000}

alive() { [ -f "$DATA/$1.pid" ] && kill -0 "$(cat "$DATA/$1.pid")" 2>/dev/null; }

grafana_bin() {
  for b in grafana-server grafana; do
    if command -v "$b" >/dev/null 2>&1; then echo "$b"; return; fi
  done
}

grafana_home() {
  for d in /usr/share/grafana /usr/local/share/grafana /opt/grafana; do
    if [ -d "$d/conf" ]; then echo "$d"; return; fi
  done
}

start() {
  mkdir -p "$DATA/prometheus"
  if alive prometheus; then
    echo "prometheus already running (pid $(cat "$DATA/prometheus.pid"))"
  else
    nohup prometheus --config.file=etc/prometheus.yml \
      --storage.tsdb.path="$DATA/prometheus" \
      --web.listen-address="$PROM_ADDR" >"$DATA/prometheus.log" 2>&1 &
    echo $! >"$DATA/prometheus.pid"
    for _ in $(seq 1 60); do
      curl -sf "http://$PROM_ADDR/-/ready" >/dev/null 2>&1 && break
      alive prometheus || { echo "prometheus exited; see $DATA/prometheus.log"; tail -n 20 "$DATA/prometheus.log"; exit 1; }
      sleep 0.5
    done
    echo "prometheus: http://$PROM_ADDR (targets: /targets, alerts: /alerts)"
  fi

  local gbin ghome
  gbin=$(grafana_bin)
  ghome=$(grafana_home)
  if [ -n "$gbin" ] && [ -n "$ghome" ]; then
    if alive grafana; then
      echo "grafana already running (pid $(cat "$DATA/grafana.pid"))"
    else
      mkdir -p "$DATA/grafana"
      local sub=""
      [ "$gbin" = grafana ] && sub=server
      FLOTILLA_DASHBOARDS="$PWD/grafana/dashboards" \
      GF_PATHS_PROVISIONING="$PWD/grafana/provisioning" \
      GF_PATHS_DATA="$PWD/$DATA/grafana" \
      GF_PATHS_LOGS="$PWD/$DATA/grafana" \
      GF_SERVER_HTTP_ADDR=127.0.0.1 GF_SERVER_HTTP_PORT="$GRAFANA_PORT" \
      GF_AUTH_ANONYMOUS_ENABLED=true GF_AUTH_ANONYMOUS_ORG_ROLE=Viewer \
        nohup "$gbin" $sub --homepath "$ghome" >"$DATA/grafana.log" 2>&1 &
      echo $! >"$DATA/grafana.pid"
      echo "grafana: http://127.0.0.1:$GRAFANA_PORT/d/flotilla-overview (anonymous viewer; admin/admin to edit)"
    fi
  else
    cat <<EOT
grafana is not installed. To see the dashboard, install Grafana and run
'make monitor' again, or import grafana/dashboards/flotilla.json in any
Grafana (Dashboards -> Import) with a Prometheus data source at
http://$PROM_ADDR.
EOT
  fi
}

stop() {
  for p in grafana prometheus; do
    if alive "$p"; then
      kill "$(cat "$DATA/$p.pid")"
      for _ in $(seq 1 50); do alive "$p" || break; sleep 0.1; done
      echo "$p stopped"
    fi
    rm -f "$DATA/$p.pid"
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
