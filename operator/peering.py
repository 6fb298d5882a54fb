"""Leader election between operator replicas, the kopf way: a peering object all replicas share.

Every replica writes keep-alives into the peering object's status; the live replica with the
highest priority works and the others pause until it is gone. kopf needs the object to exist, so
the operator creates it (the peering CRDs ship in manifests/crd.yaml).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from kubellm_operator.kube import ApiError, Kube

log = logging.getLogger(__name__)

PEERING_API = "/apis/kopf.dev/v1"
ATTEMPTS = 6  # 2+4+...+32 s, about a minute of backoff while the API server is unreachable


def ensure_peering(kube: Kube, name: str, namespaces: Sequence[str]) -> bool:
    """Create the peering object(s) if missing. False when peering is impossible (no CRD, no rights).

    An unreachable API server is retried, then raised: running without a leader by accident would
    let two replicas fight.
    """
    attempt = 0
    while True:
        try:
            _create_all(kube, name, namespaces)
            return True
        except ApiError as error:
            if not error.transient:
                log.warning("running without leader election: cannot use kopf peering %r (%s)", name, error)
                return False
            attempt += 1
            if attempt == ATTEMPTS:
                raise
            time.sleep(2**attempt)


def _create_all(kube: Kube, name: str, namespaces: Sequence[str]) -> None:
    if not namespaces:
        _create(kube, f"{PEERING_API}/clusterkopfpeerings", "ClusterKopfPeering", name, None)
    for namespace in namespaces:
        _create(kube, f"{PEERING_API}/namespaces/{namespace}/kopfpeerings", "KopfPeering", name, namespace)


def _create(kube: Kube, path: str, kind: str, name: str, namespace: str | None) -> None:
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    try:
        kube.request("POST", path, {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": metadata})
    except ApiError as error:
        if error.status != 409:  # 409: it exists already, which is all we need
            raise
