"""The user docs stay true to the code they describe."""

from __future__ import annotations

import re

from engine.api.server import build_app

from .conftest import REPO

DOCS = REPO / "docs"
SEED_BASE_URL = 'base_url="http://vllm-service:8000/v1"'


class _RoutesOnly:
    """build_app needs an engine to build; listing routes touches none of it but the tokenizer's presence."""

    served_model_name = "m"
    tokenizer = None


def served_routes() -> set[tuple[str, str]]:
    app = build_app(_RoutesOnly())  # routes only; nothing is served
    return {
        (route.method, route.resource.canonical) for route in app.router.routes() if route.method != "HEAD"
    }


def test_api_reference_documents_every_route() -> None:
    reference = (DOCS / "api-reference.md").read_text()
    routes = served_routes()
    assert ("POST", "/v1/chat/completions") in routes
    missing = [f"{method} {path}" for method, path in sorted(routes) if f"`{method} {path}`" not in reference]
    assert not missing, f"docs/api-reference.md does not document {missing}"
    documented = set(re.findall(r"^\| `(GET|POST) (/[^`]*)`", reference, flags=re.MULTILINE))
    assert documented <= routes, f"documented but not served: {documented - routes}"


def test_api_reference_lists_every_metric_the_engine_exports() -> None:
    from engine.metrics import EngineMetrics

    exported = {metric.name for metric in EngineMetrics("m").registry.collect()}
    operations = (DOCS / "operations.md").read_text()
    missing = [name for name in sorted(exported) if f"`{name}" not in operations]
    assert not missing, f"docs/operations.md does not list {missing}"


def test_quickstart_and_notes_use_the_seed_client_code() -> None:
    for doc in ("quickstart.md", "api-reference.md"):
        text = (DOCS / doc).read_text()
        assert SEED_BASE_URL in text and 'model="meta-llama/Llama-3.2-3B-Instruct"' in text, doc
    quickstart = (DOCS / "quickstart.md").read_text()
    assert "helm install kubellm charts/kubellm" in quickstart
    assert "kubectl apply -f manifests/samples/vllm.yaml" in quickstart
    assert (REPO / "manifests" / "samples" / "vllm.yaml").exists()


def test_troubleshooting_covers_every_condition_reason_the_operator_sets() -> None:
    from kubellm_operator.status import STUCK_WAITING_REASONS

    source = (REPO / "operator" / "status.py").read_text() + (REPO / "operator" / "reconcile.py").read_text()
    reasons = set(re.findall(r'return "(?:True|False)", "([A-Z]\w+)"', source))
    reasons |= set(re.findall(r'Problem\(\s*"([A-Z]\w+)"', source)) | set(STUCK_WAITING_REASONS)
    assert {"Unschedulable", "CrashLoopBackOff", "AllReplicasReady"} <= reasons  # the regexes still match
    operations = (DOCS / "operations.md").read_text()
    missing = [reason for reason in sorted(reasons) if f"`{reason}`" not in operations]
    assert not missing, f"docs/operations.md does not explain {missing}"
