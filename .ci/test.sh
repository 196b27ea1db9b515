#!/usr/bin/env bash
# The whole test suite, after .ci/setup.sh: the module-circle check and the unit tests,
# client tests against a real cluster
# (tests/integration), the always-on pools on a cluster that preloads the library
# (tests/always_on) and the replication-lag gate beside a standby (tests/replication),
# clusters the test harness starts and stops itself, the upgrade
# path from 0.1.0 (tests/upgrade), the Citus
# scale-out tests (tests/citus), the dashboard in a headless Chromium (dashboard/tests),
# the fault-injection suite (tests/faults), one round of
# both suites under CPU contention (.ci/stress.sh), the Debian
# package (.ci/package-test.sh), then the benchmarks in smoke mode (tiny sizes, seconds) so that they cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_TEST_THREADS=1
# Dependencies between the modules of src/ run one way.
python3 .ci/module_cycles.py
# Unit tests of the pure parts (no server; milliseconds).
cargo test --release --lib
cargo test --release --test integration
# Always-on pools (their own cluster, with pg_chunkwise preloaded).
cargo test --release --test always_on -- --nocapture
# The replication-lag gate (a primary and a standby of their own).
cargo test --release --test replication -- --nocapture
# The upgrade path from the first release (built from git history) to this build.
cargo test --release --test upgrade
# Scale-out over a local 3-node Citus cluster (skips where Citus is not installed).
cargo test --release --test citus
# The web dashboard: its unit tests, then a real headless Chromium against its own cluster.
bash .ci/dashboard.sh --browser
cargo test --release -p chunkwise-dashboard
# Fault injection (its own cluster); prints its report table.
cargo test --release --test faults -- --nocapture
# One round of the integration and fault suites under CPU contention (make test-stress
# runs ten).
STRESS_ROUNDS=1 bash .ci/stress.sh
# The Debian package: build, apt-get install, run, remove (then the build is reinstalled).
bash .ci/package-test.sh
CHUNKWISE_SETUP_DONE=1 bash bench/run.sh --smoke
