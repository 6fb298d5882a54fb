"""Where the e2e scenario runs: the cluster in $KUBECONFIG, or (unset) the repository's local control plane.

E2E_OPERATOR=in-cluster  the operator is already deployed in that cluster (helm / manifests/operator.yaml);
                         otherwise the scenario runs `kubellm operator` locally against the cluster, as a
                         developer would.
"""

import os
import shutil
from collections.abc import Iterator

import pytest

from e2e.kubectl import REPO, Kubectl


@pytest.fixture(scope="session")
def kubectl() -> Iterator[Kubectl]:
    if os.environ.get("KUBECONFIG"):
        binary = shutil.which("kubectl")
        if binary is None:
            pytest.fail("KUBECONFIG is set but kubectl is not on PATH", pytrace=False)
        yield Kubectl(binary, dict(os.environ))
        return
    from tests.cluster.binaries import ClusterBinaries
    from tests.cluster.localcluster import LocalCluster

    binaries = ClusterBinaries.default()
    binaries.ensure_built()
    cluster = LocalCluster.in_temp_dir(binaries=binaries)
    cluster.start()
    try:
        yield Kubectl(str(binaries.path("kubectl")), cluster.env)
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def operator(kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The CRDs installed, and an operator watching the cluster."""
    kubectl("apply", "--server-side", "-f", str(REPO / "manifests" / "crd.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/modeldeployments.kubellm.io", "--timeout=60s")
    if os.environ.get("E2E_OPERATOR") == "in-cluster":
        yield
        return
    from tests.operator.operator_process import OperatorProcess

    process = OperatorProcess(kubectl.env, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    try:
        yield
    finally:
        process.stop()
        print("operator log tail:\n" + process.log_tail())
