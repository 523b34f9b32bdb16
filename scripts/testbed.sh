#!/usr/bin/env bash
# A containerd testbed by hand (root, Debian 12): installs what is missing,
# then starts containerd in the background with the project's images, or
# tears it down (no process, mount, cgroup dir or bridge left behind).
#
#   scripts/testbed.sh up [DIR] [--cni]   start; prints the CRI endpoint
#   scripts/testbed.sh down [DIR]         tear down
#
# DIR defaults to .testbed/manual. Tests and the demo start their own
# testbeds in-process (testbed/src/containerd.rs); this is for poking at one
# with crictl/ctr or pointing `ephemerald run` at it.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
action="${1:-}"
dir="${2:-${repo_root}/.testbed/manual}"
shift $(( $# > 2 ? 2 : $# )) || true

case "${action}" in
    up|down) ;;
    *) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 64 ;;
esac

"${repo_root}/scripts/install-deps.sh"
cd "${repo_root}"
cargo build --quiet -p ephemerald-testbed
exec "${repo_root}/target/debug/ephemerald-testbed" testbed "${action}" --dir "${dir}" "$@"
