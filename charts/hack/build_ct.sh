#!/usr/bin/env bash
# Builds chart-testing's `ct` once from Go modules and caches it, with the two config files it reads
# (etc/chart_schema.yaml, etc/lintconf.yaml from the same module), under
#   ~/.cache/kubellm/ct/<CT_VERSION>/
# like tests/cluster/build.sh does for the control plane. A warm run takes milliseconds.
# Prints the directory on its last line of stdout.
set -euo pipefail

CT_VERSION="${CT_VERSION:-v3.14.0}"
ROOT="${KUBELLM_CACHE:-$HOME/.cache/kubellm}/ct/$CT_VERSION"

if [[ -x "$ROOT/ct" && -s "$ROOT/chart_schema.yaml" && -s "$ROOT/lintconf.yaml" ]]; then
  echo "$ROOT"
  exit 0
fi
command -v go >/dev/null 2>&1 || { echo "build_ct: 'go' is required to build ct" >&2; exit 2; }
mkdir -p "$ROOT"
export GOFLAGS="-trimpath -buildvcs=false" GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
module="github.com/helm/chart-testing/v3"
# A throwaway wrapper module and an explicit version (as tests/cluster/build.sh does): `go install pkg@v`
# asks the proxy for the module's version list, which proxy.golang.org refuses for this module.
work="$ROOT/src"
rm -rf "$work" && mkdir -p "$work"
printf 'module kubellm.local/ct\n\ngo 1.24\n' >"$work/go.mod"
echo "[build_ct] building ct $CT_VERSION" >&2
(cd "$work" && go get "$module/ct@$CT_VERSION" && CGO_ENABLED=0 go build -ldflags="-s -w" -o "$ROOT/ct.tmp" "$module/ct")
src="$(cd "$work" && go list -m -json "$module" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')"
install -m 0644 "$src/etc/chart_schema.yaml" "$ROOT/chart_schema.yaml"
install -m 0644 "$src/etc/lintconf.yaml" "$ROOT/lintconf.yaml"
mv "$ROOT/ct.tmp" "$ROOT/ct"
rm -rf "$work"
echo "$ROOT"
