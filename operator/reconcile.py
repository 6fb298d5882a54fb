"""One reconcile of one ModelDeployment: read it, apply its children, prune strays, write status.

Independent of kopf (handlers.py only decides *when* to call it), so the same code runs from a
create, an update, an operator restart, or a child that changed under us. Every step is
idempotent: applying unchanged children and writing an unchanged status touch nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubellm_operator import gateway, keda, names
from kubellm_operator.desired import Manifest, Owner, desired_children
from kubellm_operator.kube import ApiError, Kube
from kubellm_operator.spec import ModelDeploymentSpec, ModelDeploymentStatus
from kubellm_operator.status import RETRIED_PROBLEMS, Observed, Problem, compute_status

log = logging.getLogger(__name__)

# Every kind the operator may create, for pruning children the spec no longer asks for.
CHILD_KINDS = [
    ("v1", "PersistentVolumeClaim"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    (gateway.INFERENCE_POOL_API_VERSION, "InferencePool"),
    (gateway.HTTP_ROUTE_API_VERSION, "HTTPRoute"),
    (keda.SCALED_OBJECT_API_VERSION, "ScaledObject"),
]


@dataclass(frozen=True)
class OptionalKind:
    """A kind from CRDs a cluster may not have: a 404 on it means "not installed", not "bad spec"."""

    reason: str  # the Problem's reason while the CRD is missing
    remedy: str  # what the user can do, in their terms


OPTIONAL_KINDS = {
    "InferencePool": OptionalKind(
        "CRDNotInstalled", "install it (see docs/operations.md) or remove spec.router"
    ),
    "HTTPRoute": OptionalKind("CRDNotInstalled", "install it (see docs/operations.md) or remove spec.router"),
    "ScaledObject": OptionalKind(
        "KedaNotInstalled",
        "install KEDA (https://keda.sh/docs/latest/deploy/) or set spec.autoscaling.mode to hpa",
    ),
}


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_spec(resource: dict[str, Any]) -> tuple[ModelDeploymentSpec | None, Problem | None]:
    """The schema should have caught everything; if not, say what is wrong instead of crashing."""
    name = resource.get("metadata", {}).get("name")
    if name is not None and not names.is_dns_1035_label(name):
        # A CRD from before the name rule (helm upgrade leaves CRDs alone) lets such names in; refuse
        # before applying anything, rather than after the Deployment, when the Service is refused.
        return None, Problem("InvalidSpec", f"{names.DNS_1035_MESSAGE}; got {name!r}")
    try:
        return ModelDeploymentSpec.model_validate(resource.get("spec") or {}), None
    except ValidationError as error:
        details = "; ".join(
            f"spec.{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return None, Problem("InvalidSpec", details)


def controlled_by(obj: dict[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences", [])
    return any(ref.get("controller") and ref.get("uid") == uid for ref in refs)


def denied_by_admission(error: ApiError) -> bool:
    """A validating admission webhook's or ValidatingAdmissionPolicy's denial, whatever status it answered with
    (a webhook may pick 400 or 422; a policy's default reason is Invalid, 422): the cluster's policy, which an
    administrator may change as with a 403, not a spec the API server cannot take. Told apart by the API
    server's own words for the two (k8s.io/apiserver's webhook and validating admission plugins), e.g.
    `deployments.apps "vllm" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' denied request: ...`."""
    message = error.message
    webhook = "admission webhook " in message and " denied the request" in message
    return webhook or ("ValidatingAdmissionPolicy " in message and " denied request" in message)


def child_conflict(kind: str, name: str, existing: dict[str, Any], owner: Owner) -> Problem:
    """An object of the child's name that is not this resource's, in words that say what to do about it."""
    refs = existing.get("metadata", {}).get("ownerReferences", [])
    controller = next((ref for ref in refs if ref.get("controller")), {})
    if (controller.get("apiVersion"), controller.get("kind"), controller.get("name")) == (
        names.API_VERSION,
        names.KIND,
        owner.name,
    ):
        # Names are unique in a namespace, so its owner was deleted and this resource re-created in its place
        # (`kubectl delete` then `apply`, `kubectl replace --force`): the garbage collector removes the old
        # children in moments, and the retry creates ours. Nothing for the user to delete.
        return Problem(
            "ChildConflict",
            f"{kind} {name} still belongs to the deleted ModelDeployment {owner.name} (uid "
            f"{controller.get('uid')}) that this one replaces; waiting for the garbage collector to remove it",
        )
    return Problem(
        "ChildConflict",
        f"{kind} {name} already exists and is not managed by this ModelDeployment; "
        "delete it or choose another name",
    )


class Reconciler:
    def __init__(self, kube: Kube, clock: Callable[[], str] = utc_now) -> None:
        self.kube = kube
        self.clock = clock
        # kopf runs handlers for one resource and for its children concurrently; one at a time per resource.
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[namespace, name]

    def reconcile(self, namespace: str, name: str, *, prune: bool = True) -> ModelDeploymentStatus | None:
        """Make the children match the spec, then report. None if the resource is gone or going."""
        with self._lock(namespace, name):
            resource = self._live_resource(namespace, name)
            if resource is None:
                return None
            owner = Owner(name, namespace, resource["metadata"]["uid"])
            spec, problem = parse_spec(resource)
            deployment = None
            if spec is not None:
                if spec.autoscaler == "keda" and spec.replicas is None:
                    self._seed_replicas(namespace, name, spec)
                problem, deployment = self._apply_children(owner, spec, prune)
                if deployment is None:
                    # The apply stopped short (a refused spec change, a conflict): the pods of the spec
                    # applied before still serve, and the replica counts must say so, not 0/N.
                    deployment = self._own_deployment(namespace, name, owner.uid)
            return self._write_status(resource, spec, problem, deployment)

    def refresh_status(self, namespace: str, name: str) -> ModelDeploymentStatus | None:
        """Only observe and report (a pod changed; the children are as the last reconcile applied them).

        The status keeps the observedGeneration and the problem that reconcile recorded: a spec changed
        since then is not applied yet, and only the reconcile that applies it may say it was observed.
        """
        with self._lock(namespace, name):
            resource = self._live_resource(namespace, name)
            if resource is None:
                return None
            spec, problem = parse_spec(resource)
            recorded = resource.get("status") or {}
            uid = resource["metadata"]["uid"]
            deployment = self._own_deployment(namespace, name, uid) if spec is not None else None
            return self._write_status(
                resource,
                spec,
                problem or _recorded_problem(recorded),
                deployment,
                generation=recorded.get("observedGeneration", 0),
            )

    def _live_resource(self, namespace: str, name: str) -> dict[str, Any] | None:
        resource = self.kube.get(names.API_VERSION, names.KIND, namespace, name)
        if resource is None or resource["metadata"].get("deletionTimestamp"):
            return None  # garbage collection removes the children; re-creating them would fight it
        return resource

    def _own_deployment(self, namespace: str, name: str, uid: str) -> dict[str, Any] | None:
        """The engine Deployment as it is, if it is this resource's (not someone else's of that name)."""
        deployment = self.kube.get("apps/v1", "Deployment", namespace, name)
        return deployment if deployment is not None and controlled_by(deployment, uid) else None

    def _seed_replicas(self, namespace: str, name: str, spec: ModelDeploymentSpec) -> None:
        """Mode keda: KEDA reads and writes the count through the scale subresource, which the API server serves
        only while spec.replicas exists (without it a Scale GET is an internal error: "the spec replicas field
        does not exist"). Start it at the lower bound; from then on it is KEDA's."""
        log.info("setting spec.replicas of %s/%s to %s for KEDA", namespace, name, spec.fixed_replicas)
        body = {"spec": {"replicas": spec.fixed_replicas}}
        self.kube.merge_patch(names.API_VERSION, names.KIND, namespace, name, body)

    def _apply_children(
        self, owner: Owner, spec: ModelDeploymentSpec, prune: bool
    ) -> tuple[Problem | None, dict[str, Any] | None]:
        desired = desired_children(owner, spec)
        deployment = None
        missing_crd: Problem | None = None
        for manifest in desired:
            applied = self._apply_child(owner, manifest)
            if isinstance(applied, Problem):
                optional = OPTIONAL_KINDS.get(manifest["kind"])
                if optional is None or applied.reason != optional.reason:
                    return applied, None
                # A missing CRD blocks only its own child: the engine serves meanwhile, the other children
                # (and pruning, e.g. of the HPA that mode hpa had) follow the spec.
                missing_crd = missing_crd or applied
                continue
            if manifest["kind"] == "Deployment":
                deployment = applied  # the apply response carries the Deployment's status
        if prune:
            self._prune(owner, desired)
        return missing_crd, deployment

    def _apply_child(self, owner: Owner, manifest: Manifest) -> dict[str, Any] | Problem:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        existing = self.kube.get(manifest["apiVersion"], kind, owner.namespace, name)
        if existing is not None and not controlled_by(existing, owner.uid):
            # Applying would take over (and later garbage-collect) someone else's object.
            return child_conflict(kind, name, existing, owner)
        try:
            return self.kube.apply(manifest)
        except ApiError as error:
            if error.status == 403 or denied_by_admission(error):
                # Not the spec's fault: a quota, an admission webhook or policy, or missing RBAC. The
                # handler retries with backoff; meanwhile the status quotes the server.
                return Problem("Forbidden", f"the API server forbade {kind} {name}: {error.message}")
            if error.transient:
                raise
            if error.status == 404 and kind in OPTIONAL_KINDS:
                group = manifest["apiVersion"].split("/")[0]
                optional = OPTIONAL_KINDS[kind]
                return Problem(
                    optional.reason,
                    f"{kind} {name} needs the {kind} CRD ({manifest['apiVersion']}), which this cluster does not "
                    f"have: {optional.remedy}; the {group} API answered 404",
                )
            # The API server refused what the spec asked for (e.g. a malformed affinity).
            return Problem("InvalidSpec", f"the API server refused {kind} {name}: {error.message}")

    def _prune(self, owner: Owner, desired: list[Manifest]) -> None:
        wanted = {(m["kind"], m["metadata"]["name"]) for m in desired}
        selector = f"{names.INSTANCE_LABEL}={owner.name},{names.MANAGED_BY_LABEL}={names.FIELD_MANAGER}"
        for api_version, kind in CHILD_KINDS:
            try:
                objects = self.kube.list(api_version, kind, owner.namespace, selector)
            except ApiError as error:
                if error.status == 404 and kind in OPTIONAL_KINDS:
                    continue  # CRD not installed: nothing of this kind to prune
                raise
            for obj in objects:
                name = obj["metadata"]["name"]
                if (kind, name) not in wanted and controlled_by(obj, owner.uid):
                    log.info("deleting %s %s/%s: no longer in the spec", kind, owner.namespace, name)
                    self.kube.delete(api_version, kind, owner.namespace, name)

    def _write_status(
        self,
        resource: dict[str, Any],
        spec: ModelDeploymentSpec | None,
        problem: Problem | None,
        deployment: dict[str, Any] | None,
        generation: int | None = None,
    ) -> ModelDeploymentStatus:
        """generation: the one this status describes; by default the resource's (a full reconcile)."""
        meta = resource["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        pods = []
        if deployment is not None:
            pods = self.kube.list("v1", "Pod", namespace, names.selector_string(name))
        current = resource.get("status") or {}
        observed = Observed(
            name=name,
            namespace=namespace,
            generation=meta.get("generation", 0) if generation is None else generation,
            spec=spec,
            deployment=deployment,
            pods=pods,
            problem=problem,
            previous_conditions=current.get("conditions", []),
        )
        status = compute_status(observed, self.clock())
        body = status.model_dump(by_alias=True, exclude_none=True, mode="json")
        if body != current:  # an identical write would still cost a request
            self.kube.patch_status(namespace, name, body)
        return status


def _recorded_problem(status: dict[str, Any]) -> Problem | None:
    """The problem the last full reconcile found (a bad spec, or one it retries), until one finds none."""
    degraded = next((c for c in status.get("conditions", []) if c.get("type") == "Degraded"), {})
    if status.get("phase") != "Failed" and degraded.get("reason") not in RETRIED_PROBLEMS:
        return None
    return Problem(degraded.get("reason", "InvalidSpec"), degraded.get("message", ""))
