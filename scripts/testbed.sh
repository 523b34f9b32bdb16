#!/usr/bin/env bash
# A containerd testbed by hand.
#
#   scripts/testbed.sh up [DIR]     install what the testbed needs, then say how to start one
#   scripts/testbed.sh down [DIR]   say how to tear one down
#   scripts/testbed.sh status       list the testbeds under .testbed/ (and /tmp/ephemerald-*)
#
# The testbed itself is Rust: `ephemerald::testbed::containerd::Containerd`
# (src/testbed/containerd.rs). Tests start their own with `Containerd::start`
# and tear it down with `teardown()` (or on drop). `ephemerald testbed up|down`
# will call `Containerd::start_detached` / `Containerd::attach(DIR)` +
# `teardown`; until that subcommand exists, `up` and `down` only prepare the
# machine and print this.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
default_dir="${repo_root}/.testbed/manual"

usage() {
    sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 64
}

status() {
    local found=0 dir pid state
    for dir in "${repo_root}"/.testbed/*/ /tmp/ephemerald-*/; do
        [[ -f "${dir}testbed.json" ]] || continue
        found=1
        pid="$(cat "${dir}containerd.pid" 2>/dev/null || echo '?')"
        state="stopped"
        if [[ "$pid" =~ ^[0-9]+$ ]] && grep -qsF -- "${dir}config.toml" "/proc/${pid}/cmdline"; then
            state="running"
        fi
        printf '%-8s pid %-7s unix://%scontainerd.sock\n' "$state" "$pid" "$dir"
    done
    ((found)) || echo "no testbeds"
}

cmd="${1:-}"
dir="${2:-$default_dir}"
case "$cmd" in
    up)
        "${repo_root}/scripts/install-deps.sh"
        cat <<MSG
The machine has containerd, runc, the CNI plugins, busybox-static and gcc.

A testbed is started from Rust, not from this script (yet):
  - tests:  Containerd::start(ContainerdOpts::unique("my-test")).await?  (torn down on drop)
            see tests/testbed.rs; run them with: cargo test --test testbed
  - by hand, to outlive the process:
            Containerd::start_detached(ContainerdOpts::in_dir("${dir}")).await?
    then    ctr -a ${dir}/containerd.sock -n k8s.io images ls
  'ephemerald testbed up' will do this once the CLI has it.
MSG
        ;;
    down)
        cat <<MSG
Tear a testbed down from Rust: Containerd::attach(Path::new("${dir}"))?.teardown().await?
('ephemerald testbed down' will do this once the CLI has it). A testbed whose
owning process died is reaped by the next Containerd::start in the same parent
directory.
MSG
        ;;
    status)
        status
        ;;
    *)
        usage
        ;;
esac
