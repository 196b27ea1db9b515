#!/usr/bin/env bash
# Builds chunkwise-dashboard into target/release/chunkwise-dashboard (pure Rust: it needs
# only the toolchain). `.ci/dashboard.sh --browser` also installs the headless Chromium
# and chromedriver its tests drive.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/packages.sh
if [ "${1:-}" = "--browser" ]; then
  ensure_packages chromium chromium-driver
fi
command -v cargo >/dev/null || { echo "cargo (Rust) is needed: https://rustup.rs" >&2; exit 1; }
say "building chunkwise-dashboard"
cargo build --release -p chunkwise-dashboard
echo "built target/release/chunkwise-dashboard"
