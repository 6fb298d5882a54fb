"""Shared helpers for the install tests: the helm binary and rendering the chart into objects."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubellm"
HACK = REPO / "charts" / "hack"

sys.path.insert(0, str(HACK))
import k8s_tools  # noqa: E402  (charts/hack is a folder of scripts, not a package)

Manifest = dict[str, Any]
RenderChart = Callable[..., list[Manifest]]


@pytest.fixture(scope="session")
def helm() -> Path:
    return k8s_tools.tool("helm")


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, check=check, timeout=120)


def set_args(values: dict[str, str]) -> list[str]:
    return [part for key, value in values.items() for part in ("--set", f"{key}={value}")]


@pytest.fixture(scope="session")
def render_chart(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> RenderChart:
    """`helm template` with the given values (a dict written to a values file) -> parsed objects."""
    folder = tmp_path_factory.mktemp("values")

    def render(
        values: dict[str, Any] | None = None, release: str = "kubellm", namespace: str = "kubellm-system"
    ) -> list[Manifest]:
        values_file = folder / f"values-{len(list(folder.iterdir()))}.yaml"
        values_file.write_text(yaml.safe_dump(values or {}))
        out = run_helm(
            helm, "template", release, str(CHART), "--namespace", namespace, "-f", str(values_file)
        )
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]

    return render


def by_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Manifest], kind: str) -> Manifest:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]
