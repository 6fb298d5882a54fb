"""The CRD: the committed YAML is the generated one, its schema is structural and documented, the
samples validate, and the server-side defaults agree with the operator's own."""

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubellm_operator.crd import all_crds, model_deployment_crd, render_yaml
from kubellm_operator.spec import ModelDeploymentSpec
from tests.operator.samples import SAMPLES, sample

CRD_FILE = Path(__file__).resolve().parents[2] / "manifests" / "crd.yaml"
VERSION = model_deployment_crd()["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = SCHEMA["properties"]["spec"]


def test_committed_crd_yaml_is_current() -> None:
    assert CRD_FILE.read_text() == render_yaml(), (
        "manifests/crd.yaml is stale: run `python -m kubellm_operator.crd > manifests/crd.yaml`"
    )


def test_committed_yaml_parses_to_the_crds() -> None:
    assert list(yaml.safe_load_all(CRD_FILE.read_text())) == all_crds()


def test_names_scope_and_version() -> None:
    spec = model_deployment_crd()["spec"]
    assert model_deployment_crd()["metadata"]["name"] == "modeldeployments.kubellm.io"
    assert (spec["group"], spec["scope"], VERSION["name"]) == ("kubellm.io", "Namespaced", "v1alpha1")
    assert spec["names"]["kind"] == "ModelDeployment"
    assert spec["names"]["shortNames"] == ["md"]


def test_status_and_scale_subresources() -> None:
    assert VERSION["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }


def test_printer_columns() -> None:
    default_columns = [c["name"] for c in VERSION["additionalPrinterColumns"] if not c.get("priority")]
    assert default_columns == ["Model", "Ready", "Replicas", "Endpoint", "Age"]
    replicas = next(c for c in VERSION["additionalPrinterColumns"] if c["name"] == "Replicas")
    assert replicas["jsonPath"] == ".status.readyOfDesired"  # "1/2", as `kubectl get deploy` shows READY


def walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural() -> None:
    """What the API server demands of a CRD schema: every node typed, no $ref, no nulls."""
    for path, node in walk(SCHEMA):
        assert "$ref" not in node and "title" not in node, path
        assert "const" not in node, path  # not in Kubernetes' JSONSchemaProps: an enum of one instead
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
            assert "anyOf" not in node, path
        assert node.get("type") != "null" and node.get("default", 0) is not None, path


def test_every_spec_field_is_documented() -> None:
    undocumented = [
        path
        for path, node in walk(SPEC_SCHEMA)
        if path and not path.endswith("[]") and "{" not in path and not node.get("description")
    ]
    assert undocumented == []


def test_quantization_field_says_what_fp8_covers() -> None:
    """The engine's --quantization fp8 quantizes the linear layers and the MoE experts (routers and the
    LM head stay float); the field's description, which `kubectl explain` shows, says so too."""
    text = SPEC_SCHEMA["properties"]["engine"]["properties"]["quantization"]["description"]
    assert "linear layers" in text and "experts" in text and "routers" in text, text


@pytest.mark.parametrize("sample_file", sorted(p.name for p in SAMPLES.glob("*.yaml")))
def test_samples_validate_against_the_schema(sample_file: str) -> None:
    jsonschema.Draft4Validator(SCHEMA).validate(sample(sample_file))


@pytest.mark.parametrize(
    "bad_spec",
    [
        {},  # no model
        {"model": {"source": "meta-llama/Llama-3.2-3B-Instruct"}},  # neither hf:// nor a path
        {"model": {}, "engine": {"gpuMemoryUtilization": 1.5}},
        {"model": {}, "engine": {"gpuMemoryUtilization": 0}},
        {"model": {}, "service": {"type": "ExternalName"}},
        {"model": {}, "replicas": -1},
        {"model": {}, "shmSize": "lots"},
        {"model": {}, "engine": {"quantization": "awq"}},
        {"model": {}, "engine": {"kvCacheDtype": "fp8_e5m2"}},
    ],
)
def test_schema_rejects_bad_specs(bad_spec: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(SCHEMA).validate(
            {"apiVersion": "kubellm.io/v1alpha1", "kind": "ModelDeployment", "spec": bad_spec}
        )


def apply_schema_defaults(value: Any, node: dict[str, Any]) -> Any:
    """Kubernetes' structural defaulting: fill absent fields with defaults, top-down."""
    if isinstance(value, dict):
        for name, child in node.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = child["default"]
            if name in value:
                value[name] = apply_schema_defaults(value[name], child)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        return [apply_schema_defaults(item, node["items"]) for item in value]
    return value


@pytest.mark.parametrize("sample_file", sorted(p.name for p in SAMPLES.glob("*.yaml")))
def test_server_defaults_agree_with_the_operators(sample_file: str) -> None:
    written = sample(sample_file)["spec"]
    defaulted = apply_schema_defaults(yaml.safe_load(yaml.safe_dump(written)), SPEC_SCHEMA)
    assert defaulted["gpu"]["resourceName"] == "nvidia.com/gpu"  # nested defaults reach inner fields
    assert ModelDeploymentSpec.model_validate(defaulted) == ModelDeploymentSpec.model_validate(written)


def test_cel_rules_name_real_fields() -> None:
    rules = {
        path: node["x-kubernetes-validations"]
        for path, node in walk(SCHEMA)
        if "x-kubernetes-validations" in node
    }
    assert set(rules) == {"", ".spec", ".spec.modelCache", ".spec.autoscaling"}
    assert any("self.minReplicas <= self.maxReplicas" == r["rule"] for r in rules[".spec.autoscaling"])
    fields = {path for path, _ in walk(SCHEMA)}
    for path in ("", ".spec"):
        for rule in rules[path]:
            for field, call in re.findall(r"self((?:\.\w+)+)(\(?)", rule["rule"]):
                if call:  # self.metadata.name.size(): a method of the last field
                    field = field.rpartition(".")[0]
                assert path + field in fields, f"{rule['rule']} names {path + field}, which the schema lacks"


def test_rules_on_whole_objects_blame_a_field() -> None:
    """Without fieldPath the API server reports `<nil>: Invalid value: "object"`."""
    fields = {path for path, _ in walk(SCHEMA)}
    for path in ("", ".spec"):
        node = SCHEMA if not path else SPEC_SCHEMA
        for rule in node["x-kubernetes-validations"]:
            assert path + rule["fieldPath"] in fields, rule
            assert rule.get("message") or rule.get("messageExpression"), rule


def test_conditions_are_metav1_conditions() -> None:
    condition = SCHEMA["properties"]["status"]["properties"]["conditions"]["items"]
    assert set(condition["required"]) >= {"type", "status", "reason", "lastTransitionTime"}
    props = condition["properties"]
    assert props["lastTransitionTime"]["format"] == "date-time"
    assert props["reason"]["pattern"] == "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    assert props["status"]["enum"] == ["True", "False", "Unknown"]
    assert props["observedGeneration"] == {
        "description": "The metadata.generation this condition describes.",
        "type": "integer",
        "minimum": 0,
    }


def test_peering_crds_have_kopfs_plural_names() -> None:
    names = {crd["spec"]["names"]["kind"]: crd["spec"]["names"]["plural"] for crd in all_crds()[1:]}
    assert names == {"ClusterKopfPeering": "clusterkopfpeerings", "KopfPeering": "kopfpeerings"}
