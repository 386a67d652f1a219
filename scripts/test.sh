#!/usr/bin/env bash
# The whole test run, from a fresh clone: set-up, formatting, lints, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-test-env.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# The crate map's promises that the compiler does not check: the endpoint and Drogue crates build no
# database driver, and the server binary links none of the load generator.
for crate in ajour-types ajour-transport ajour-drogue ajour-service ajour-client ajour-build ajour-console; do
    if cargo tree --locked -p "$crate" -e normal --prefix none | grep -q '^sqlx '; then
        echo "error: $crate depends on sqlx (docs/ARCHITECTURE.md says it must not)" >&2
        exit 1
    fi
done
for dependency in hdrhistogram ajour-bench ajour-testkit; do
    if cargo tree --locked -p ajour -e normal --prefix none | grep -q "^$dependency "; then
        echo "error: the ajour binary depends on $dependency (it belongs to ajour-bench)" >&2
        exit 1
    fi
done

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# cargo prints one result line per test binary, the last often a doc-test run of 0 tests; close
# with the totals.
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
