#!/usr/bin/env bash
# The project's test command (README.md): everything CI runs, on a fresh machine.
# Installs what the tests need, then builds once and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# insta: a missing or changed snapshot fails instead of being written.
export CI="${CI:-true}"

cargo test --workspace --locked --all-targets
cargo test --workspace --locked --doc
