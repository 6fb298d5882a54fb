"""A spec the schema let through but the operator cannot read becomes a readable problem, not a crash."""

from kubellm_operator.reconcile import parse_spec
from kubellm_operator.status import Problem


def test_valid_spec_parses() -> None:
    spec, problem = parse_spec({"spec": {"model": {"source": "hf://org/m"}, "replicas": 2}})
    assert problem is None and spec is not None and spec.replicas == 2


def test_unreadable_spec_names_the_field() -> None:
    spec, problem = parse_spec({"spec": {"model": {"source": 5}, "gpu": {"count": "many"}}})
    assert spec is None
    assert problem == Problem(
        "InvalidSpec",
        "spec.model.source: Input should be a valid string; spec.gpu.count: Input should be a valid integer, "
        "unable to parse string as an integer",
    )


def test_missing_spec() -> None:
    spec, problem = parse_spec({})
    assert spec is None and problem == Problem("InvalidSpec", "spec.model: Field required")


def test_a_name_that_is_no_dns_label_is_refused_before_anything_is_applied() -> None:
    """CRDs from before the name rule (helm upgrade leaves CRDs alone) let `3b-chat` through."""
    spec, problem = parse_spec({"metadata": {"name": "3b-chat"}, "spec": {"model": {}}})
    assert spec is None and problem is not None and problem.reason == "InvalidSpec"
    assert (
        problem.message.startswith("metadata.name must be a DNS-1035 label")
        and "'3b-chat'" in problem.message
    )


def test_a_dns_label_name_parses() -> None:
    spec, problem = parse_spec({"metadata": {"name": "llama-3b"}, "spec": {"model": {}}})
    assert problem is None and spec is not None
