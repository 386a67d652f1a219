#!/usr/bin/env bash
# Builds the Ajour server image without a container engine: an OCI image layout made with umoci
# from an `ajour` binary already built, holding exactly what the binary needs at run time, and
# configured as the Containerfile's image is (user 65532, `ajour serve`, AJOUR_* defaults, port
# 8080, the OCI labels). Optionally pushes it with skopeo. See docs/deployment.md.
#
#   scripts/build-image.sh [options] [BINARY]
#
#   BINARY                the ajour binary to put in the image (default: $AJOUR_BINARY, else
#                         target/release/ajour: `cargo build --release --locked -p ajour`)
#   --layout DIR          where to write the OCI image layout (default: $AJOUR_IMAGE_LAYOUT, else
#                         target/image/ajour); an existing layout there is replaced
#   --tag TAG             its tag in the layout (default: the binary's version)
#   --revision REV        org.opencontainers.image.revision (default: `git rev-parse HEAD`)
#   --source URL          org.opencontainers.image.source (default: `repository` in Cargo.toml)
#   --strip               strip the binary's debug information in the image (smaller layer)
#   --push REF            then copy it to docker://REF with skopeo (e.g. registry.example/ajour:0.1.0)
#   --push-insecure       push over plain HTTP or without verifying TLS (test registries only)
#   --push-creds USER:PW  credentials for the push (default: $AJOUR_IMAGE_PUSH_CREDS, else
#                         skopeo's own: `skopeo login`)
#
# Needs root (umoci unpacks and repacks with the files' real owners; without root it falls back
# to umoci --rootless, and the data directory is then owned by root in the image), umoci, ldd,
# and skopeo for --push: `apt-get install umoci skopeo` on Debian. The binary's dynamic loader
# and every library `ldd` lists are copied from this machine: the image carries its own glibc and
# runs on any Linux host of the same architecture. A static binary gets none.
set -euo pipefail

say() { echo "build-image: $*"; }
fail() {
    printf 'build-image: error: %b\n' "$*" >&2
    exit 1
}

root=$(cd "$(dirname "$0")/.." && pwd)
binary=
layout=${AJOUR_IMAGE_LAYOUT:-$root/target/image/ajour}
tag=
revision=
source_url=
strip=false
push=
push_insecure=false
push_creds=${AJOUR_IMAGE_PUSH_CREDS:-}

while [ $# -gt 0 ]; do
    case "$1" in
        --layout) layout=${2:?--layout needs a directory}; shift 2 ;;
        --tag) tag=${2:?--tag needs a tag}; shift 2 ;;
        --revision) revision=${2:?--revision needs a commit}; shift 2 ;;
        --source) source_url=${2:?--source needs a URL}; shift 2 ;;
        --strip) strip=true; shift ;;
        --push) push=${2:?--push needs an image reference}; shift 2 ;;
        --push-insecure) push_insecure=true; shift ;;
        --push-creds) push_creds=${2:?--push-creds needs USER:PASSWORD}; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *) [ -z "$binary" ] || fail "one binary only: $binary and $1"; binary=$1; shift ;;
    esac
done
binary=${binary:-${AJOUR_BINARY:-$root/target/release/ajour}}

# ---- what is needed -----------------------------------------------------------------------------
for tool in umoci ldd; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (Debian: apt-get install ${tool/ldd/libc-bin})"
done
[ -z "$push" ] || command -v skopeo >/dev/null || fail "skopeo is not installed (apt-get install skopeo)"
[ -f "$binary" ] || fail "no binary at $binary: build it (cargo build --release --locked -p ajour) or name one"
[ -x "$binary" ] || fail "$binary is not executable"
rootless=()
if [ "$(id -u)" -ne 0 ]; then
    say "not root: umoci runs --rootless (files in the image are owned by root)"
    rootless=(--rootless)
fi

version_line=$("$binary" --version 2>/dev/null) || fail "$binary --version failed: is it an ajour binary for this machine?"
case "$version_line" in
    "ajour "*) version=${version_line#ajour } ;;
    *) fail "$binary --version printed '$version_line', not 'ajour VERSION'" ;;
esac
tag=${tag:-$version}
if [ -z "$revision" ]; then
    revision=$(git -C "$root" rev-parse HEAD 2>/dev/null) || fail "not a git checkout: give --revision"
    if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        say "warning: the work tree has uncommitted changes; the revision label says $revision"
    fi
fi
if [ -z "$source_url" ]; then
    source_url=$(sed -n 's/^repository *= *"\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
fi
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
say "binary $binary: ajour $version, revision $revision"

# ---- the layout ---------------------------------------------------------------------------------
if [ -e "$layout" ]; then
    # Only ever delete what is recognisably an image layout this script could have made.
    [ -f "$layout/oci-layout" ] || fail "$layout exists and is not an OCI image layout: not replacing it"
    say "replacing the image layout at $layout"
    rm -rf "$layout"
fi
mkdir -p "$(dirname "$layout")"
work=$(mktemp -d "${TMPDIR:-/tmp}/ajour-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
bundle=$work/bundle

say "creating the image layout $layout:$tag"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack "${rootless[@]}" --image "$layout:$tag" "$bundle" >/dev/null
rootfs=$bundle/rootfs

# ---- the root file system -----------------------------------------------------------------------
say "adding /usr/local/bin/ajour"
install -d -m 0755 "$rootfs/usr/local/bin"
install -m 0755 "$binary" "$rootfs/usr/local/bin/ajour"
if $strip; then
    command -v strip >/dev/null || fail "--strip needs strip (apt-get install binutils)"
    strip --strip-debug "$rootfs/usr/local/bin/ajour"
fi

# What the dynamic loader will look for: the loader itself (the line without "=>") and each
# library by the path ldd found it at. Copied as files (symbolic links resolved), at those paths.
ldd_output=$(ldd "$binary" 2>&1) || grep -q "not a dynamic executable" <<<"$ldd_output" ||
    fail "ldd $binary failed: $ldd_output"
if grep -q "not found" <<<"$ldd_output"; then
    fail "libraries of $binary are missing on this machine:\n$ldd_output"
fi
libraries=()
while read -r line; do
    case "$line" in
        *"statically linked"* | *"not a dynamic executable"*) ;;
        *" => "*) path=${line#* => }; path=${path%% (*}; [ "${path:0:1}" = / ] && libraries+=("$path") ;;
        /*) libraries+=("${line%% (*}") ;;
    esac
done <<<"$ldd_output"
for library in "${libraries[@]}"; do
    say "adding $library (from ldd)"
    install -d -m 0755 "$rootfs$(dirname "$library")"
    cp -L "$library" "$rootfs$library"
done

say "adding /etc/passwd, /etc/group (root, nonroot 65532), /etc/nsswitch.conf"
install -d -m 0755 "$rootfs/etc"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$rootfs/etc/passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$rootfs/etc/group"
# glibc (2.34 and later) has the files and dns lookups built in: no NSS module to copy.
printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group" "$rootfs/etc/nsswitch.conf"

# The MQTT (Drogue) and registry clients trust the system's roots (rustls-native-certs reads
# this bundle); the OCI, PostgreSQL and Hawkbit clients carry their own roots too.
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[ -f "$ca_bundle" ] || fail "no CA bundle at $ca_bundle (apt-get install ca-certificates)"
say "adding $ca_bundle"
install -d -m 0755 "$rootfs/etc/ssl/certs"
install -m 0644 "$ca_bundle" "$rootfs$ca_bundle"

say "adding /var/lib/ajour (owned by 65532), /tmp, /home/nonroot"
install -d -m 1777 "$rootfs/tmp"
install -d -m 0755 "$rootfs/var/lib/ajour" "$rootfs/home/nonroot"
if [ ${#rootless[@]} -eq 0 ]; then
    chown 65532:65532 "$rootfs/var/lib/ajour" "$rootfs/home/nonroot"
fi

say "packing the layer"
umoci repack "${rootless[@]}" --image "$layout:$tag" \
    --history.created_by "scripts/build-image.sh $(basename "$binary")" "$bundle"

# ---- the configuration: as the Containerfile's -----------------------------------------------
say "configuring: user 65532, entrypoint ajour, cmd serve, port 8080, labels"
labels=(
    "org.opencontainers.image.title=ajour"
    "org.opencontainers.image.description=Ajour: firmware updates for fleets of small devices"
    "org.opencontainers.image.version=$version"
    "org.opencontainers.image.revision=$revision"
    "org.opencontainers.image.source=$source_url"
    "org.opencontainers.image.licenses=Apache-2.0"
    "org.opencontainers.image.created=$created"
)
config=(
    --config.user 65532:65532
    --config.entrypoint ajour
    --config.cmd serve
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    --config.env AJOUR_LISTEN=0.0.0.0:8080
    --config.env AJOUR_DATA_DIR=/var/lib/ajour
    --config.env "AJOUR_LOG=info,tower_http=warn,sqlx=warn"
    --config.exposedports 8080/tcp
    --config.workingdir /var/lib/ajour
    --config.volume /var/lib/ajour
    --os linux
    --architecture "$(uname -m | sed 's/x86_64/amd64/; s/aarch64/arm64/')"
    --created "$created"
)
for label in "${labels[@]}"; do
    config+=(--config.label "$label" --manifest.annotation "$label")
done
umoci config --image "$layout:$tag" "${config[@]}" --history.created_by "scripts/build-image.sh: configuration"
umoci gc --layout "$layout"

manifest=$(grep -o 'sha256:[0-9a-f]\{64\}' "$layout/index.json" | head -1)
size=$(du -sh "$layout" | cut -f1)
say "built $layout:$tag ($size, manifest $manifest)"

if [ -n "$push" ]; then
    copy=(skopeo copy)
    $push_insecure && copy+=(--dest-tls-verify=false)
    [ -z "$push_creds" ] || copy+=(--dest-creds "$push_creds")
    say "pushing to docker://$push"
    "${copy[@]}" "oci:$layout:$tag" "docker://$push" >"$work/push.log" 2>&1 ||
        fail "skopeo copy to $push failed:\n$(cat "$work/push.log")"
    say "pushed docker://$push"
fi
