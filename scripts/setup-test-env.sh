#!/usr/bin/env bash
# Installs and starts what the test suite needs on a fresh Debian machine. Idempotent: packages
# already installed and services already running are left alone. Each test still starts its own
# instances (on free ports, in temp dirs); this only makes the programs available.
set -euo pipefail

# Debian packages the tests run as real peers.
packages=(postgresql-client mosquitto mosquitto-clients docker-registry skopeo)

missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# PostgreSQL: tests create (and drop) a database of their own on the local server.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "setup: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432
