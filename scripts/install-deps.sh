#!/usr/bin/env bash
# Installs the Debian packages the testbed and the build need: containerd and
# runc (the CRI runtime), the CNI plugins, busybox-static (the debug image),
# protobuf-compiler (containerd-client's build), iproute2 (the CNI bridge's
# teardown), gcc and libc6-dev (the static pause and app programs),
# ca-certificates (the CA bundle of the agent's own image, as in deploy/Dockerfile).
#
# Idempotent: asks dpkg what is missing first and runs `apt-get update` and
# `apt-get install` only when something is. Needs root; Debian 12.
#
# Usage: scripts/install-deps.sh
set -euo pipefail

PACKAGES=(
    containerd
    runc
    containernetworking-plugins
    busybox-static
    protobuf-compiler
    iproute2
    gcc
    libc6-dev
    ca-certificates
)

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    exit 0
fi

[[ "$(id -u)" == 0 ]] || die "missing ${missing[*]}; run as root to install them"
command -v apt-get >/dev/null || die "missing ${missing[*]} and there is no apt-get (Debian 12 expected)"

log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
if ! apt-get update -qq >"$out" 2>&1; then
    cat "$out" >&2
    die "apt-get update failed"
fi
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$out" 2>&1; then
    cat "$out" >&2
    die "apt-get install ${missing[*]} failed"
fi

for tool in containerd ctr runc containerd-shim-runc-v2 busybox protoc ip gcc; do
    command -v "$tool" >/dev/null || die "$tool is still missing after the install"
done
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local ]] || die "CNI plugins missing in /usr/lib/cni"
log "installed ${missing[*]}"
