"""kopf wiring: *when* to reconcile. What a reconcile does lives in reconcile.py.

- the ModelDeployment is created, changed, or found again after an operator restart -> full reconcile;
- one of its children changes or disappears (a hand edit, a deletion) -> re-apply (drift repair);
  a child whose status alone moved (a rollout's replica counts, an HPA's metrics) is left alone;
- one of its pods changes (scheduled, ready, crashing) -> refresh the status.

No finalizers (no deletion handler, no timers): children carry owner references, so Kubernetes
deletes them with the resource even while the operator is down.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import kopf

from kubellm_operator import names
from kubellm_operator.kube import PLURALS, ApiError, Kube
from kubellm_operator.reconcile import CHILD_KINDS, Reconciler
from kubellm_operator.status import RETRIED_PROBLEMS

log = logging.getLogger(__name__)

# (group, version, plural) of each child kind the reconciler writes: one list (reconcile.CHILD_KINDS)
# for pruning, watching and the RBAC test; plurals as the API client spells them (kube.PLURALS).
CHILD_RESOURCES = [
    (api_version.rpartition("/")[0], api_version.rpartition("/")[2], PLURALS[kind])
    for api_version, kind in CHILD_KINDS
]
OWNED = {names.MANAGED_BY_LABEL: names.FIELD_MANAGER}
EVENT_RETRIES = 4  # kopf does not retry event handlers, so transient errors are retried here


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Handler progress goes into our own annotations (the CRD's status schema has no room for kopf's).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # Kubernetes Events only for what a person should see
    # Watch only what we own, filtered by the API server rather than in this process.
    selector = f"{names.MANAGED_BY_LABEL}={names.FIELD_MANAGER}"
    for group, version, plural in [*CHILD_RESOURCES, ("", "v1", "pods")]:
        settings.watching.label_selectors[group, version, plural] = selector
    if memo.get("reconciler") is None:  # main.main passes one in; `kopf run` does not
        memo.reconciler = Reconciler(Kube.from_environment())


def _retry_delay(retry: int) -> float:
    return min(300.0, 5.0 * 2**retry)


@kopf.on.resume(names.GROUP, names.VERSION, names.PLURAL)
@kopf.on.create(names.GROUP, names.VERSION, names.PLURAL)
@kopf.on.update(names.GROUP, names.VERSION, names.PLURAL)
def model_deployment_changed(
    namespace: str, name: str, memo: kopf.Memo, retry: int, body: kopf.Body | None = None, **_: Any
) -> None:
    """body: the resource, which kopf always passes (None only where a test calls this outside kopf)."""
    try:
        status = memo.reconciler.reconcile(namespace, name)
    except ApiError as error:
        if error.status == 404:
            return  # deleted while we worked on it: garbage collection takes it from here
        if error.transient or error.status == 403:
            # 403: RBAC, a quota or an admission webhook said no; an administrator may change that.
            raise kopf.TemporaryError(str(error), delay=_retry_delay(retry)) from error
        raise kopf.PermanentError(str(error)) from error
    if status is None:
        return
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    if body is not None and (degraded.reason in RETRIED_PROBLEMS or status.phase == "Failed"):
        # An Event for `kubectl describe md` and event-based alerting. Posted explicitly: kopf (>= 1.45)
        # no longer turns handler errors into Events unless every log line becomes one.
        kopf.warn(body, reason=degraded.reason, message=degraded.message)
    if degraded.reason in RETRIED_PROBLEMS:
        # Someone else's object may go away, a quota may be raised: look again later rather than never.
        raise kopf.TemporaryError(degraded.message, delay=_retry_delay(retry))
    if status.phase == "Failed":
        raise kopf.PermanentError(degraded.message)  # fixed by changing the spec


def _owner_of(labels: dict[str, str]) -> str | None:
    return labels.get(names.INSTANCE_LABEL)


def _with_retries(action: Callable[[], object]) -> bool:
    """Run action, retrying transient API errors; False if it gave up."""
    for attempt in range(EVENT_RETRIES):
        try:
            action()
            return True
        except ApiError as error:
            if error.status == 404:
                return True  # the resource went away meanwhile; nothing left to do
            if not error.transient or attempt == EVENT_RETRIES - 1:
                log.warning("giving up after %d attempts: %s", attempt + 1, error)
                return False
            time.sleep(2**attempt)
    return False


def _desired_part(body: kopf.Body | dict[str, Any]) -> str:
    """What a re-apply could put back: labels, annotations, owner references and spec (or data), not
    status."""
    meta = body.get("metadata", {})
    kept = {k: v for k, v in body.items() if k not in ("metadata", "status")}
    ours = [meta.get("labels"), meta.get("annotations"), meta.get("ownerReferences"), kept]
    return json.dumps(ours, sort_keys=True, default=str)


def child_changed(
    type: str | None, namespace: str, labels: dict[str, str], body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    owner = _owner_of(labels)
    if type is None or owner is None:
        return  # the initial listing: resume handlers already reconcile every resource
    # kopf keeps one memo per object across its events: what we last saw of this child.
    part = None if type == "DELETED" else _desired_part(body)
    if part is not None and memo.get("child_part") == part:
        # Only the status moved (a rollout's replica counts, an HPA's metrics every sync period): no
        # drift to put back. A Deployment's status feeds the ModelDeployment's, so refresh that.
        if body.get("kind") == "Deployment":
            _with_retries(lambda: memo.reconciler.refresh_status(namespace, owner))
        return
    reapplied = _with_retries(lambda: memo.reconciler.reconcile(namespace, owner, prune=False))
    memo["child_part"] = part if reapplied else None  # a failed re-apply is tried again next event


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=OWNED, id=f"child-{_plural}")(child_changed)


@kopf.on.event("", "v1", "pods", labels=OWNED)
def pod_changed(type: str | None, namespace: str, labels: dict[str, str], memo: kopf.Memo, **_: Any) -> None:
    owner = _owner_of(labels)
    if type is None or owner is None:
        return
    _with_retries(lambda: memo.reconciler.refresh_status(namespace, owner))
