# Flotilla. `make run` starts a local 3-node cluster; `make test` runs every
# test. Both install missing system packages first.
#
# One cargo profile (release) serves tests, binaries and benchmarks: RocksDB
# takes ~20 minutes to compile per profile on 2 cores. The target directory
# lives outside the clone so it survives between clones and CI runs.

export CARGO_TARGET_DIR ?= /var/tmp/flotilla-target
CARGO ?= cargo
PROFILE_FLAGS := --release
BIN_DIR := bin
BINARIES := flotilla-server flotilla-ctl flotilla-bench

.PHONY: bench-compare bench-scale deps test-deps build run cluster-up node-add node-remove stop status clean-data test crash-test chaos fmt-check clippy bench clean monitor monitor-stop

deps:
	@scripts/install-deps.sh

# Tests also check the alert rules and a live Prometheus (package prometheus).
test-deps:
	@scripts/install-deps.sh prometheus

build: deps
	$(CARGO) build $(PROFILE_FLAGS) --bins
	@mkdir -p $(BIN_DIR)
	@for b in $(BINARIES); do cp -f $(CARGO_TARGET_DIR)/release/$$b $(BIN_DIR)/$$b; done
	@echo "binaries in $(BIN_DIR)/"

run: build
	@scripts/local-cluster.sh start

# A local cluster of NODES nodes (first start only; later starts restart
# every node that has a data dir).
NODES ?= 3
cluster-up: build
	@NODES=$(NODES) scripts/local-cluster.sh start

# One more node joins the local cluster; the placement driver moves
# replicas to it.
node-add: build
	@scripts/local-cluster.sh add

# Decommission node ID: its replicas move away, then it stops.
node-remove: build
	@scripts/local-cluster.sh remove $(ID)

stop: monitor-stop
	@scripts/local-cluster.sh stop

# Prometheus (and Grafana when installed) watching the `make run` cluster.
monitor: test-deps
	@scripts/monitor.sh start

monitor-stop:
	@scripts/monitor.sh stop

status:
	@scripts/local-cluster.sh status

clean-data: stop
	rm -rf .flotilla

test: test-deps
	$(CARGO) test $(PROFILE_FLAGS) --workspace --all-targets

# The black-box crash test for ten minutes (CI runs a 45 s version inside
# `make test`). FLOTILLA_CRASH_SEED=N replays a schedule.
CRASH_SECS ?= 600
crash-test: deps
	FLOTILLA_CRASH_SECS=$(CRASH_SECS) $(CARGO) test $(PROFILE_FLAGS) --test crash -- --nocapture

# The fault suite for ten minutes: partitions, kill -9, SIGSTOP, leader
# transfers and replica moves under a linearizability-checked workload (CI
# runs a 60 s version inside `make test`). FLOTILLA_CHAOS_SEED=N replays a
# schedule; CHAOS_NODES=5 runs five nodes.
CHAOS_SECS ?= 600
CHAOS_NODES ?= 3
chaos: deps
	FLOTILLA_CHAOS_SECS=$(CHAOS_SECS) FLOTILLA_CHAOS_NODES=$(CHAOS_NODES) $(CARGO) test $(PROFILE_FLAGS) --test chaos -- --nocapture

fmt-check:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy $(PROFILE_FLAGS) --workspace --all-targets -- -D warnings

# Put then get load against the `make run` cluster.
BENCH_FLAGS ?= --clients 64 --duration 10 --value-size 128 --keys 100000
bench: build
	$(BIN_DIR)/flotilla-bench put $(BENCH_FLAGS) --metrics-endpoints 127.0.0.1:20181,127.0.0.1:20182,127.0.0.1:20183
	$(BIN_DIR)/flotilla-bench get $(BENCH_FLAGS)

# Flotilla and a 3-member etcd (Debian's etcd-server, installed if missing)
# side by side on this machine, same workloads, one table.
bench-compare: build
	@scripts/install-deps.sh etcd-server
	@scripts/bench-compare.sh

# 10,000 shards on a fresh 3-node cluster: idle CPU, RSS, a write to a
# sleeping shard, failover after kill -9 of a leader, restart to ready.
bench-scale: build
	@scripts/scale-bench.sh

clean:
	rm -rf $(BIN_DIR)
