#!/usr/bin/env bash
# Builds the autoscaling stack the KEDA tests run, once, from Go modules, and caches it (like build.sh does for
# the control plane):
#   ~/.cache/kubellm/autoscaling/keda-<KEDA_VERSION>-slim/{keda-operator,keda-adapter,crds/*.yaml}
#   ~/.cache/kubellm/autoscaling/prometheus-<PROMETHEUS_VERSION>-k8s-sd/prometheus
# A warm run takes milliseconds. Prints the cache root on its last line of stdout.
# KEDA v2.21.1 needs Go 1.27; v2.21.0 builds with Go 1.26 (the newest this project's machines have).
#
# Both are trimmed to what the tests use, to keep CI's cold run within its time (tests/cluster/README.md has
# the numbers): Prometheus with its own build tags for Kubernetes service discovery only, and KEDA with the
# scalers prometheus, cpu, memory, external and external-push only (KEDA has no build tags for that: its
# module source is copied and the other scalers' files removed; every other line is KEDA's).
set -euo pipefail

KEDA_VERSION="${KEDA_VERSION:-v2.21.0}"
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"
ROOT="${KUBELLM_CACHE:-$HOME/.cache/kubellm}/autoscaling"
KEDA_DIR="$ROOT/keda-$KEDA_VERSION-slim"
PROM_DIR="$ROOT/prometheus-$PROMETHEUS_VERSION-k8s-sd"
KEDA_SCALER_FILES="scaler.go prometheus_scaler.go cpu_memory_scaler.go external_scaler.go"

command -v go >/dev/null 2>&1 || { echo "build_autoscaling: 'go' is required" >&2; exit 2; }
export GOFLAGS="-trimpath -buildvcs=false" GOTOOLCHAIN="${GOTOOLCHAIN:-local}" CGO_ENABLED=0
log() { echo "[build_autoscaling $(date -u +%H:%M:%S)] $*" >&2; }

build_prometheus() {
  [[ -x "$PROM_DIR/prometheus" ]] && return 0
  local work="$PROM_DIR/src"
  rm -rf "$work" && mkdir -p "$work"
  printf 'module kubellm.local/prometheus\n\ngo 1.26\n' >"$work/go.mod"
  log "building prometheus $PROMETHEUS_VERSION (Kubernetes service discovery only)"
  (cd "$work" && go get "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION" \
    && go build -tags remove_all_sd,enable_kubernetes_sd -ldflags="-s -w" -o "$PROM_DIR/prometheus.tmp" \
      github.com/prometheus/prometheus/cmd/prometheus)
  mv "$PROM_DIR/prometheus.tmp" "$PROM_DIR/prometheus"
  rm -rf "$work"
}

# KEDA's source with only the scalers in KEDA_SCALER_FILES, and buildScaler's switch (between its own
# TRIGGERS-START/END markers) reduced to them.
slim_keda_source() {  # module source dir, destination
  cp -r "$1" "$2" && chmod -R u+w "$2"
  find "$2" -name '*_test.go' -delete
  local file
  for file in "$2"/pkg/scalers/*.go; do
    [[ " $KEDA_SCALER_FILES " == *" $(basename "$file") "* ]] || rm "$file"
  done
  # A constant of a removed scaler's file (azure_queue_scaler.go) that the kept ones use.
  printf 'package scalers\n\nconst externalMetricType = "External"\n' >"$2/pkg/scalers/kubellm_slim.go"
  local builder="$2/pkg/scaling/scalers_builder.go"
  grep -q 'TRIGGERS-START' "$builder" || { echo "build_autoscaling: no TRIGGERS-START in $builder" >&2; exit 3; }
  awk '
    /TRIGGERS-START/ {
      print "\t// TRIGGERS-START (kubellm: the scalers this build keeps)"
      print "\tswitch triggerType {"
      print "\tcase \"cpu\":\n\t\treturn scalers.NewCPUMemoryScaler(corev1.ResourceCPU, config)"
      print "\tcase \"memory\":\n\t\treturn scalers.NewCPUMemoryScaler(corev1.ResourceMemory, config)"
      print "\tcase \"external\":\n\t\treturn scalers.NewExternalScaler(config)"
      print "\tcase \"external-push\":\n\t\treturn scalers.NewExternalPushScaler(config)"
      print "\tcase \"prometheus\":\n\t\treturn scalers.NewPrometheusScaler(config)"
      print "\tdefault:\n\t\treturn nil, fmt.Errorf(\"no scaler found for type: %s (this KEDA build has prometheus, cpu, memory, external and external-push)\", triggerType)"
      print "\t}"
      skip = 1
      next
    }
    /TRIGGERS-END/ { skip = 0 }
    !skip
  ' "$builder" >"$builder.new" && mv "$builder.new" "$builder"
}

build_keda() {
  [[ -x "$KEDA_DIR/keda-operator" && -x "$KEDA_DIR/keda-adapter" && -s "$KEDA_DIR/crds/keda.sh_scaledobjects.yaml" ]] \
    && return 0
  local work="$KEDA_DIR/src" module="github.com/kedacore/keda/v2"
  rm -rf "$work" && mkdir -p "$work" "$KEDA_DIR/crds"
  printf 'module kubellm.local/keda\n\ngo 1.26\n' >"$work/go.mod"
  local src
  src="$(cd "$work" && go mod download -json "$module@$KEDA_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')"
  slim_keda_source "$src" "$work/keda"
  # KEDA's own go.mod carries `replace` lines a dependent module must repeat (they do not propagate).
  grep -E '^replace .*=>' "$src/go.mod" | sed 's/^replace //' | while read -r old _oldv _arrow new newv; do
    (cd "$work" && go mod edit -replace="$old=$new@$newv")
  done
  log "building keda $KEDA_VERSION (operator + metrics adapter; scalers: $KEDA_SCALER_FILES)"
  # `go get` pins KEDA's dependencies as its release does; the build then takes KEDA itself from the copy.
  (cd "$work" && go get "$module/cmd/operator@$KEDA_VERSION" "$module/cmd/adapter@$KEDA_VERSION" \
    && go mod edit -replace="$module=./keda" \
    && go build -ldflags="-s -w" -o "$KEDA_DIR/keda-operator.tmp" "$module/cmd/operator" \
    && go build -ldflags="-s -w" -o "$KEDA_DIR/keda-adapter.tmp" "$module/cmd/adapter")
  install -m 0644 "$src"/config/crd/bases/*.yaml "$KEDA_DIR/crds/"
  mv "$KEDA_DIR/keda-operator.tmp" "$KEDA_DIR/keda-operator"
  mv "$KEDA_DIR/keda-adapter.tmp" "$KEDA_DIR/keda-adapter"
  rm -rf "$work"
}

mkdir -p "$ROOT"
build_prometheus
build_keda
echo "$ROOT"
