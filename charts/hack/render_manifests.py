"""Render the plain manifests from the Helm chart, so the chart stays the one source of truth.

    python charts/hack/render_manifests.py           # rewrite manifests/rbac.yaml, operator.yaml, chart crds/
    python charts/hack/render_manifests.py --check   # exit 1 (with a diff) if any of them is stale

The CRDs (ModelDeployment, and kopf's peering CRDs) come from the operator's generator
(`python -m kubellm_operator.crd > manifests/crd.yaml`); the chart's crds/crd.yaml is a byte-identical
copy written here.
"""

from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k8s_tools import tool  # noqa: E402  (a sibling script, not a package)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubellm"
MANIFESTS = REPO / "manifests"
CHART_CRD = CHART / "crds" / "crd.yaml"

# What `kubectl apply -f manifests/` installs: the release name and namespace of the rendered chart.
RELEASE = "kubellm"
NAMESPACE = "kubellm-system"

# Which chart templates go into which plain manifest.
MANIFEST_TEMPLATES: dict[str, list[str]] = {
    "operator.yaml": ["templates/namespace.yaml", "templates/deployment.yaml"],
    "rbac.yaml": ["templates/serviceaccount.yaml", "templates/rbac.yaml", "templates/user-roles.yaml"],
}

# Labels that only make sense for a Helm release; the plain manifests are not managed by Helm.
HELM_ONLY_LINES = ("helm.sh/chart:", "app.kubernetes.io/managed-by: Helm")


def header(name: str) -> str:
    return (
        f"# manifests/{name}: GENERATED from charts/kubellm by charts/hack/render_manifests.py.\n"
        "# Do not edit: change the chart and re-run the script (a test fails when they drift).\n"
        f"# Installs into namespace {NAMESPACE}, watching ModelDeployments in every namespace.\n"
    )


def render_chart(templates: list[str]) -> str:
    show_only = [arg for template in templates for arg in ("--show-only", template)]
    command = [str(tool("helm")), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    command += ["--set", "createNamespace=true", *show_only]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def plain_manifest(name: str) -> str:
    lines = render_chart(MANIFEST_TEMPLATES[name]).splitlines()
    kept = [line for line in lines if not line.strip().startswith(HELM_ONLY_LINES)]
    return header(name) + "\n".join(kept).strip() + "\n"


def generated_crd() -> str:
    """The operator's CRD generator output: the single source of the ModelDeployment schema."""
    command = [sys.executable, "-m", "kubellm_operator.crd"]
    # Safe-path mode: the repository's operator/ folder must not shadow the standard library's `operator`.
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    return subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO, env=env).stdout


def expected_files() -> dict[Path, str]:
    crd = generated_crd()
    files = {MANIFESTS / name: plain_manifest(name) for name in MANIFEST_TEMPLATES}
    files[CHART_CRD] = crd
    return files


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = parser.parse_args()
    stale = 0
    for path, text in expected_files().items():
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale += 1
            rel = path.relative_to(REPO)
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), f"{rel} (on disk)", f"{rel} (rendered)", lineterm=""
            )
            print("\n".join(list(diff)[:60]))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print(f"\n{stale} file(s) out of date: run `python charts/hack/render_manifests.py`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
