"""One source of truth: the CRD generator feeds manifests/ and the chart; the chart feeds the plain
manifests; the CRD feeds docs/crd-reference.md. Any of them edited alone fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubellm_operator.crd import render_yaml
from kubellm_operator.spec import ModelDeploymentSpec

from .conftest import CHART, HACK, REPO

SAMPLES = sorted((REPO / "manifests" / "samples").glob("*.yaml"))


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HACK / name), *args], capture_output=True, text=True, timeout=120
    )


def test_crd_is_identical_in_generator_manifests_and_chart() -> None:
    generated = render_yaml()
    assert (REPO / "manifests" / "crd.yaml").read_text() == generated, (
        "manifests/crd.yaml is stale: python -m kubellm_operator.crd > manifests/crd.yaml"
    )
    chart_crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert chart_crds == ["crd.yaml"], f"unexpected files in the chart's crds/: {chart_crds}"
    assert (CHART / "crds" / "crd.yaml").read_text() == generated, (
        "charts/kubellm/crds/crd.yaml is stale: python charts/hack/render_manifests.py"
    )


def test_plain_manifests_are_rendered_from_the_chart() -> None:
    result = run_script("render_manifests.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_crd_reference_is_generated_from_the_crd() -> None:
    result = run_script("gen_crd_reference.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (REPO / "docs" / "crd-reference.md").read_text()
    # Spot checks that the generator walked the whole schema, nested and status fields included.
    for field in ("`spec.model.source`", "`spec.modelCache.persistentVolumeClaim.size`", "`spec.autoscaling.maxReplicas`",
                  "`status.conditions[].reason`", "`spec.engine.env[].name`"):  # fmt: skip
        assert field in reference


def model_deployment_schema() -> dict[str, Any]:
    crd = next(
        d
        for d in yaml.safe_load_all((REPO / "manifests" / "crd.yaml").read_text())
        if d["spec"]["group"] == "kubellm.io"
    )
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_are_valid_model_deployments(sample: Path) -> None:
    (resource,) = [d for d in yaml.safe_load_all(sample.read_text()) if d]
    assert resource["apiVersion"] == "kubellm.io/v1alpha1" and resource["kind"] == "ModelDeployment"
    # The CRD's own schema (OpenAPI v3.0: draft 4 semantics), as the API server checks it...
    jsonschema.Draft4Validator(model_deployment_schema()).validate(resource)
    # ...and the operator's model of the spec, as the reconciler reads it.
    ModelDeploymentSpec.model_validate(resource["spec"])


def test_the_samples_the_issue_promises_exist() -> None:
    specs = {p.name: yaml.safe_load(p.read_text()) for p in SAMPLES}

    def having(check: Any) -> list[str]:
        return [name for name, res in specs.items() if check(res["metadata"]["name"], res["spec"])]

    assert having(
        lambda name, spec: (
            name == "vllm" and spec["model"].get("source") == "hf://meta-llama/Llama-3.2-3B-Instruct"
        )
    )
    assert having(lambda _, spec: spec.get("gpu", {}).get("count") == 0 and "source" not in spec["model"]), (
        "CPU sample"
    )
    assert having(
        lambda _, spec: (
            ModelDeploymentSpec.model_validate(spec).gpus_per_replica == 2
            and "persistentVolumeClaim" in spec.get("modelCache", {})
            and "autoscaling" in spec
        )
    ), "2 GPUs + PVC cache + autoscaling sample"
    assert having(
        lambda _, spec: (
            spec["model"].get("source") == "hf://meta-llama/Llama-3.3-70B-Instruct"
            and spec["engine"]["tensorParallelSize"] == 4
            and ModelDeploymentSpec.model_validate(spec).gpus_per_replica == 4
        )
    ), "70B sample with tensor parallelism 4"
