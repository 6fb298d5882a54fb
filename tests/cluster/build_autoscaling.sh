#!/usr/bin/env bash
# Builds the autoscaling stack the KEDA tests run, once, from Go modules, and caches it (like build.sh does for
# the control plane):
#   ~/.cache/kubellm/autoscaling/keda-<KEDA_VERSION>/{keda-operator,keda-adapter,crds/*.yaml}
#   ~/.cache/kubellm/autoscaling/prometheus-<PROMETHEUS_VERSION>/prometheus
# A warm run takes milliseconds. Prints the cache root on its last line of stdout.
# KEDA v2.21.1 needs Go 1.27; v2.21.0 builds with Go 1.26 (the newest this project's machines have).
set -euo pipefail

KEDA_VERSION="${KEDA_VERSION:-v2.21.0}"
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"
ROOT="${KUBELLM_CACHE:-$HOME/.cache/kubellm}/autoscaling"
KEDA_DIR="$ROOT/keda-$KEDA_VERSION"
PROM_DIR="$ROOT/prometheus-$PROMETHEUS_VERSION"

command -v go >/dev/null 2>&1 || { echo "build_autoscaling: 'go' is required" >&2; exit 2; }
export GOFLAGS="-trimpath -buildvcs=false" GOTOOLCHAIN="${GOTOOLCHAIN:-local}" CGO_ENABLED=0
log() { echo "[build_autoscaling $(date -u +%H:%M:%S)] $*" >&2; }

build_prometheus() {
  [[ -x "$PROM_DIR/prometheus" ]] && return 0
  local work="$PROM_DIR/src"
  rm -rf "$work" && mkdir -p "$work"
  printf 'module kubellm.local/prometheus\n\ngo 1.26\n' >"$work/go.mod"
  log "building prometheus $PROMETHEUS_VERSION"
  (cd "$work" && go get "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION" \
    && go build -ldflags="-s -w" -o "$PROM_DIR/prometheus.tmp" github.com/prometheus/prometheus/cmd/prometheus)
  mv "$PROM_DIR/prometheus.tmp" "$PROM_DIR/prometheus"
  rm -rf "$work"
}

build_keda() {
  [[ -x "$KEDA_DIR/keda-operator" && -x "$KEDA_DIR/keda-adapter" && -s "$KEDA_DIR/crds/keda.sh_scaledobjects.yaml" ]] \
    && return 0
  local work="$KEDA_DIR/src" module="github.com/kedacore/keda/v2"
  rm -rf "$work" && mkdir -p "$work" "$KEDA_DIR/crds"
  printf 'module kubellm.local/keda\n\ngo 1.26\n' >"$work/go.mod"
  # KEDA's own go.mod carries `replace` lines a dependent module must repeat (they do not propagate).
  local keda_mod
  keda_mod="$(cd "$work" && go mod download -json "$module@$KEDA_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')"
  grep -E '^replace .*=>' "$keda_mod" | sed 's/^replace //' | while read -r old _oldv _arrow new newv; do
    (cd "$work" && go mod edit -replace="$old=$new@$newv")
  done
  log "building keda $KEDA_VERSION (operator + metrics adapter)"
  (cd "$work" && go get "$module/cmd/operator@$KEDA_VERSION" "$module/cmd/adapter@$KEDA_VERSION" \
    && go build -ldflags="-s -w" -o "$KEDA_DIR/keda-operator.tmp" "$module/cmd/operator" \
    && go build -ldflags="-s -w" -o "$KEDA_DIR/keda-adapter.tmp" "$module/cmd/adapter")
  local src
  src="$(cd "$work" && go list -m -json "$module" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')"
  install -m 0644 "$src"/config/crd/bases/*.yaml "$KEDA_DIR/crds/"
  mv "$KEDA_DIR/keda-operator.tmp" "$KEDA_DIR/keda-operator"
  mv "$KEDA_DIR/keda-adapter.tmp" "$KEDA_DIR/keda-adapter"
  rm -rf "$work"
}

mkdir -p "$ROOT"
build_prometheus
build_keda
echo "$ROOT"
