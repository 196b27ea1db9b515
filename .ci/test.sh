#!/usr/bin/env bash
# The whole test suite, after .ci/setup.sh: client tests against a real cluster
# (tests/), which the test harness starts and stops itself, then the benchmarks in
# smoke mode (tiny sizes, seconds) so that they cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_TEST_THREADS=1
cargo test --release --test integration
CHUNKWISE_SETUP_DONE=1 bash bench/run.sh --smoke
