"""The operator the cluster test modules run against, with the ModelDeployment CRD installed
(test_operator_cluster.py has its own: its CRDs come from a fixture)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.localcluster import LocalCluster
from tests.operator.cluster_objects import install_crd
from tests.operator.operator_process import OperatorProcess, running_operator


@pytest.fixture(scope="module")
def operator(
    k8s_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(k8s_cluster)
    with running_operator(k8s_cluster.env, tmp_path_factory.mktemp("operator")) as process:
        yield process
