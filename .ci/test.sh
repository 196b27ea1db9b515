#!/usr/bin/env bash
# The whole test suite, after .ci/setup.sh: client tests against a real cluster
# (tests/), which the test harness starts and stops itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_TEST_THREADS=1
cargo test --release --test integration
