"""The shipped samples, loaded the way the operator sees them (helpers for the operator tests)."""

from pathlib import Path
from typing import Any

import yaml

from kubellm_operator.spec import ModelDeploymentSpec

SAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "samples"


def sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((SAMPLES / name).read_text())


def sample_spec(name: str) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(sample(name)["spec"])
