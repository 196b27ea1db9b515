#!/usr/bin/env bash
# make test-stress: the integration, always-on, replication and fault suites under CPU contention, round after
# round. A busy loop runs on every core beside the tests (STRESS_BURNERS, default: the
# number of cores), so the cluster, its workers and the test client all get less CPU
# than they want and interleave differently: a race that shows only on a busy machine
# shows here. STRESS_ROUNDS rounds (default 10) must all pass; CI runs one.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${STRESS_ROUNDS:-10}
burners=${STRESS_BURNERS:-$(nproc)}
export RUST_TEST_THREADS=1

# Build first: a compile beside the busy loops would take minutes.
cargo test --release --test integration --test always_on --test replication --test faults --no-run

pids=()
stop_burners() { [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true; }
trap stop_burners EXIT
for _ in $(seq "$burners"); do
    (while :; do :; done) &
    pids+=($!)
done

started=$SECONDS
for round in $(seq "$rounds"); do
    echo "== stress round $round of $rounds ($burners busy loops beside the tests)"
    cargo test --release --test integration
    cargo test --release --test always_on
    cargo test --release --test replication
    cargo test --release --test faults -- --nocapture
done
echo "== $rounds stress rounds passed in $((SECONDS - started)) s"
