"""`ct lint` (helm/chart-testing, what chart repositories run in CI) passes on the chart: Chart.yaml against
ct's schema (yamale), Chart.yaml and values.yaml through yamllint, and `helm lint` with the defaults and
with every ci/*-values.yaml (the non-default cases).

ct is built once from Go modules into ~/.cache/kubellm/ct (charts/hack/build_ct.sh); yamllint and yamale
come from the dev extra; helm from the control plane's cache (charts/hack/k8s_tools.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CHART, HACK, REPO

pytestmark = pytest.mark.slow  # the first run builds ct (about a minute)


@pytest.fixture(scope="module")
def ct_dir() -> Path:
    result = subprocess.run(
        ["bash", str(HACK / "build_ct.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode != 0:  # a failure, not a skip: CI has Go, so a missing toolchain is a broken setup
        pytest.fail(f"building ct failed:\n{result.stderr[-3000:]}", pytrace=False)
    return Path(result.stdout.strip().splitlines()[-1])


def ct_lint(ct_dir: Path, helm: Path, chart: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    # ct runs helm, yamllint and yamale from PATH: the cached helm and this venv's tools.
    path = os.pathsep.join([str(helm.parent), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    command = [
        str(ct_dir / "ct"),
        "lint",
        "--charts",
        str(chart),
        "--validate-maintainers=false",  # it asks GitHub whether each maintainer is an account
        "--check-version-increment=false",  # it compares with the target branch's version
        "--chart-yaml-schema",
        str(ct_dir / "chart_schema.yaml"),
        "--lint-conf",
        str(ct_dir / "lintconf.yaml"),
    ]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env={**os.environ, "PATH": path}, timeout=300
    )


def test_ct_lint_passes_with_every_ci_values_file(ct_dir: Path, helm: Path) -> None:
    ci_values = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
    assert len(ci_values) >= 3, ci_values
    result = ct_lint(ct_dir, helm, CHART.relative_to(REPO), REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All charts linted successfully" in output
    for name in ci_values:  # ct found and used each one
        assert f'Linting chart with values file "charts/kubellm/ci/{name}"' in output


def test_ct_lint_fails_on_a_broken_chart(ct_dir: Path, helm: Path, tmp_path: Path) -> None:
    """The check above can fail: a Chart.yaml without its (required) version."""
    chart = tmp_path / "kubellm"
    shutil.copytree(CHART, chart)
    chart_yaml = chart / "Chart.yaml"
    chart_yaml.write_text(
        "\n".join(line for line in chart_yaml.read_text().splitlines() if not line.startswith("version:"))
    )
    result = ct_lint(ct_dir, helm, chart, tmp_path)
    assert result.returncode != 0
    assert "version" in result.stdout + result.stderr
