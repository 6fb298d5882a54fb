"""The Helm chart renders what a Kubernetes user expects, and only valid objects."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .conftest import CHART, REPO, RenderChart, by_kind, one, run_helm

KUBERNETES_VERSION = "1.34.0"  # the local control plane's minor release
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)

VLLM_MODEL = {"name": "vllm", "spec": {"model": {"source": "hf://meta-llama/Llama-3.2-3B-Instruct"}}}


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    package = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == package


def test_helm_lint_is_clean(helm: Path) -> None:
    for extra in ([], ["--set", "operator.watchNamespaces={team-a,team-b}"]):
        result = run_helm(helm, "lint", "--strict", str(CHART), *extra, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"models": [VLLM_MODEL], "operator": {"replicas": 2, "verbose": True}},
        {"operator": {"watchNamespaces": ["team-a", "team-b"]}, "createNamespace": True},
        *(yaml.safe_load(p.read_text()) for p in sorted((CHART / "ci").glob("*-values.yaml"))),
    ],
    ids=[
        "defaults",
        "with-model",
        "namespaced",
        *(p.stem for p in sorted((CHART / "ci").glob("*-values.yaml"))),
    ],
)
def test_every_rendered_object_is_valid_kubernetes(render_chart: RenderChart, values: dict) -> None:
    """Strict schemas of the API server's own release: unknown or mistyped fields fail here."""
    objects = render_chart(values)
    for obj in objects:
        if obj["apiVersion"].startswith("kubellm.io/"):
            continue  # checked against our CRD's schema in test_models_from_values
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, error.path))}: {error.message}"
            )
        labels = obj["metadata"].get("labels", {})
        missing = [label for label in RECOMMENDED_LABELS if label not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"


def test_default_install_renders_the_operator_and_its_identity(render_chart: RenderChart) -> None:
    objects = render_chart()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "ServiceAccount",
    ]
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/kubellm/operator:0.1.0"  # appVersion by default
    assert container["command"] == ["kubellm", "operator"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    probe = container["livenessProbe"]["httpGet"]
    port = next(p for p in container["ports"] if p["name"] == probe["port"])
    assert (probe["path"], port["containerPort"]) == ("/healthz", 8080)
    assert "--liveness-port=8080" in container["args"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The pod template matches the Deployment's selector (else the API server refuses it).
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # No Helm release name leaks into a fixed value: another release gets other names.
    other = render_chart(release="second")
    assert {o["metadata"]["name"] for o in other}.isdisjoint({o["metadata"]["name"] for o in objects})


def test_models_from_values_become_model_deployments(render_chart: RenderChart) -> None:
    models = [
        VLLM_MODEL,
        {
            "name": "tiny",
            "namespace": "demo",
            "labels": {"team": "a"},
            "spec": {"model": {}, "gpu": {"count": 0}},
        },
    ]
    objects = render_chart({"models": models}, namespace="serving")
    found = {o["metadata"]["name"]: o for o in by_kind(objects, "ModelDeployment")}
    assert set(found) == {"vllm", "tiny"}
    assert found["vllm"]["apiVersion"] == "kubellm.io/v1alpha1"
    assert found["vllm"]["metadata"]["namespace"] == "serving"
    assert found["vllm"]["spec"] == VLLM_MODEL["spec"]
    assert found["tiny"]["metadata"]["namespace"] == "demo"
    assert found["tiny"]["metadata"]["labels"]["team"] == "a"
    assert found["tiny"]["metadata"]["labels"]["app.kubernetes.io/component"] == "model"


def test_a_model_in_a_namespace_the_operator_does_not_watch_is_refused(render_chart: RenderChart) -> None:
    """Else it would be created and never served: no status, no pods, nothing to say why."""
    watched = {"operator": {"watchNamespaces": ["team-a"]}}
    with pytest.raises(subprocess.CalledProcessError) as failure:
        render_chart({**watched, "models": [VLLM_MODEL]}, namespace="kubellm-system")
    assert "models: vllm is in namespace kubellm-system, which the operator does not serve" in (
        failure.value.stderr
    )

    placed = render_chart({**watched, "models": [{**VLLM_MODEL, "namespace": "team-a"}]})
    assert one(placed, "ModelDeployment")["metadata"]["namespace"] == "team-a"
    cluster_wide = render_chart({"models": [{**VLLM_MODEL, "namespace": "anywhere"}]})
    assert one(cluster_wide, "ModelDeployment")["metadata"]["namespace"] == "anywhere"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"operator": {"replica": 2}}, "replica"),  # a typo is refused, not ignored
        ({"models": [{"name": "Llama_3", "spec": {"model": {}}}]}, "/models/0/name"),
        ({"models": [{"name": "vllm"}]}, "spec"),
        ({"operator": {"watchNamespaces": ["Not A Namespace"]}}, "watchNamespaces"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ],
)
def test_values_schema_refuses_bad_values(render_chart: RenderChart, values: dict, complaint: str) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failure:
        render_chart(values)
    assert complaint in failure.value.stderr


@pytest.mark.parametrize(
    ("model_sets", "base_url", "fqdn", "model_name"),
    [
        (
            ["models[0].spec.model.source=hf://meta-llama/Llama-3.2-3B-Instruct"],
            "http://vllm-service:8000/v1",
            "http://vllm-service.ml.svc.cluster.local:8000/v1",
            "meta-llama/Llama-3.2-3B-Instruct",
        ),
        (
            ["models[0].spec.model.source=hf://Qwen/Qwen3-0.6B@main", "models[0].spec.service.name=chat",
             "models[0].spec.service.port=80"],
            "http://chat:80/v1",
            "http://chat.ml.svc.cluster.local:80/v1",
            "Qwen/Qwen3-0.6B",
        ),
        (
            ["models[0].spec.gpu.count=0", "models[0].spec.model.servedModelName=tiny"],
            "http://vllm-service:8000/v1",
            "http://vllm-service.ml.svc.cluster.local:8000/v1",
            "tiny",
        ),
    ],
    ids=["hf-source", "service-override", "served-name"],
)  # fmt: skip
def test_notes_tell_how_to_reach_the_service(
    helm: Path, model_sets: list[str], base_url: str, fqdn: str, model_name: str
) -> None:
    sets = [arg for value in ["models[0].name=vllm", *model_sets] for arg in ("--set", value)]
    result = run_helm(helm, "install", "kubellm", str(CHART), "--dry-run=client", "--namespace", "ml", *sets)
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f'base_url="{base_url}"' in notes
    assert fqdn in notes
    assert f'model="{model_name}"' in notes


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "operator": {
                "watchNamespaces": ["team-a", "team-b"],
                "verbose": True,
                "extraArgs": ["--standalone"],
            }
        },
    ],
    ids=["all-namespaces", "namespaced"],
)
def test_operator_accepts_the_arguments_the_chart_passes(render_chart: RenderChart, values: dict) -> None:
    from kubellm_operator.main import build_parser

    container = one(render_chart(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])  # an unknown flag exits here
    watched = values.get("operator", {}).get("watchNamespaces")
    assert args.namespaces == watched
    assert args.all_namespaces is (watched is None)
    assert args.liveness_port == 8080


def test_namespaced_install_grants_write_access_only_in_the_watched_namespaces(
    render_chart: RenderChart,
) -> None:
    objects = render_chart({"operator": {"watchNamespaces": ["team-a", "team-b"]}})
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = by_kind(objects, "RoleBinding")
    assert all(b["subjects"][0]["namespace"] == "kubellm-system" for b in bindings)
    operator_cluster_role = next(
        r for r in by_kind(objects, "ClusterRole") if r["metadata"]["name"] == "kubellm-operator"
    )
    cluster_verbs = {verb for rule in operator_cluster_role["rules"] for verb in rule["verbs"]}
    assert cluster_verbs <= {"get", "list", "watch"}, "a namespaced operator needs no cluster-wide write"


@pytest.mark.parametrize("watch", [[], ["team-a"]], ids=["cluster-wide", "namespaced"])
def test_operator_rights_cover_every_child_kind_and_nothing_wild(
    render_chart: RenderChart, watch: list[str]
) -> None:
    from kubellm_operator.kube import PLURALS
    from kubellm_operator.reconcile import CHILD_KINDS

    objects = render_chart({"operator": {"watchNamespaces": watch}})
    grants: dict[tuple[str, str], set[str]] = {}
    for role in [*by_kind(objects, "Role"), *by_kind(objects, "ClusterRole")]:
        if role["metadata"]["name"] != "kubellm-operator":
            continue  # the aggregated roles are for people
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            assert "secrets" not in rule["resources"]
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    grants.setdefault((group, resource), set()).update(rule["verbs"])
    for api_version, kind in CHILD_KINDS:
        group = api_version.rpartition("/")[0]
        verbs = grants.get((group, PLURALS[kind]), set())
        assert {"get", "list", "watch", "create", "patch", "delete"} <= verbs, f"{kind}: only {sorted(verbs)}"
    assert {"get", "list", "watch", "patch"} <= grants[("kubellm.io", "modeldeployments")]
    assert "patch" in grants[("kubellm.io", "modeldeployments/status")]
    # blockOwnerDeletion on the children's owner references (OwnerReferencesPermissionEnforcement).
    assert grants[("kubellm.io", "modeldeployments/finalizers")] == {"update"}
    assert grants[("", "pods")] == {"get", "list", "watch"}
    peering = ("kopf.dev", "kopfpeerings" if watch else "clusterkopfpeerings")
    assert {"create", "patch", "watch"} <= grants[peering]


def test_network_policy_admits_only_the_listed_peers_to_every_engine_pod(render_chart: RenderChart) -> None:
    from kubellm_operator import names

    assert not by_kind(render_chart(), "NetworkPolicy")  # off by default
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    values = {
        "networkPolicy": {"enabled": True, "from": [prometheus]},
        "operator": {"watchNamespaces": ["team-a", "team-b"]},
    }
    policies = by_kind(render_chart(values), "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["kubellm-system", "team-a", "team-b"]
    for policy in policies:
        selected = policy["spec"]["podSelector"]["matchLabels"]
        # Exactly what the operator puts on every engine pod, whatever the ModelDeployment.
        assert selected.items() <= names.child_labels("any-model").items()
        assert "app.kubernetes.io/instance" not in selected
        assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open: Hub downloads
        [rule] = policy["spec"]["ingress"]
        assert rule["from"] == [prometheus]
        assert rule["ports"] == [{"port": names.ENGINE_PORT_NAME, "protocol": "TCP"}]
    default_peers = by_kind(render_chart({"networkPolicy": {"enabled": True}}), "NetworkPolicy")
    assert [p["spec"]["ingress"][0]["from"] for p in default_peers] == [[{"podSelector": {}}]]

    # A model the release creates in another namespace (cluster-wide operator) is covered too.
    models = [VLLM_MODEL, {**VLLM_MODEL, "name": "tiny", "namespace": "demo"}]
    with_models = by_kind(
        render_chart({"networkPolicy": {"enabled": True}, "models": models}), "NetworkPolicy"
    )
    assert sorted(p["metadata"]["namespace"] for p in with_models) == ["demo", "kubellm-system"]


def test_chart_has_maintainers_and_an_icon() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["maintainers"] and all(m["name"] for m in chart["maintainers"])
    assert chart["icon"].startswith("https://") and chart["icon"].endswith("/charts/kubellm/icon.svg")
    assert (CHART / "icon.svg").read_text().lstrip().startswith("<svg")
