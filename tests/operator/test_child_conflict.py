"""An object in the way of a child: whose it is decides what the status tells the user to do."""

from typing import Any

from kubellm_operator.desired import Owner
from kubellm_operator.reconcile import child_conflict

OWNER = Owner("vllm", "team-a", "new-uid")


def owned_by(api_version: str, kind: str, name: str) -> dict[str, Any]:
    ref = {"apiVersion": api_version, "kind": kind, "name": name, "uid": "old-uid", "controller": True}
    return {"metadata": {"name": "vllm", "ownerReferences": [ref]}}


def test_a_child_of_the_deleted_resource_this_one_replaces_is_waited_for_not_blamed_on_the_user() -> None:
    """`kubectl delete md vllm && kubectl apply -f vllm.yaml`: the old Deployment is still being collected."""
    problem = child_conflict(
        "Deployment", "vllm", owned_by("kubellm.io/v1alpha1", "ModelDeployment", "vllm"), OWNER
    )
    assert problem.reason == "ChildConflict" and problem.retried
    assert problem.message == (
        "Deployment vllm still belongs to the deleted ModelDeployment vllm (uid old-uid) that this one "
        "replaces; waiting for the garbage collector to remove it"
    )
    assert "delete it" not in problem.message


def test_someone_elses_object_asks_the_user_to_move_it() -> None:
    for existing in (
        {"metadata": {"name": "vllm"}},  # made by hand
        owned_by("apps/v1", "ReplicaSet", "vllm"),
        owned_by("kubellm.io/v1alpha1", "ModelDeployment", "other"),  # another resource's spec.service.name
    ):
        problem = child_conflict("Service", "vllm-service", existing, OWNER)
        assert problem.reason == "ChildConflict"
        assert problem.message == (
            "Service vllm-service already exists and is not managed by this ModelDeployment; "
            "delete it or choose another name"
        )
