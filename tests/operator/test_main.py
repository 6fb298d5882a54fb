"""`kubellm operator`'s command line, as a user meets it (no cluster needed)."""

import subprocess
import sys

from tests.operator.operator_process import kubellm_executable


def kubellm_operator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubellm_executable(), "operator", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_the_options() -> None:
    result = kubellm_operator("--help")
    assert result.returncode == 0
    for option in (
        "--namespace",
        "--all-namespaces",
        "--liveness-port",
        "--peering",
        "--priority",
        "--standalone",
    ):
        assert option in result.stdout


def test_namespace_and_all_namespaces_exclude_each_other() -> None:
    result = kubellm_operator("--namespace", "team-a", "--all-namespaces")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_no_cluster_is_one_clear_error_not_a_hang() -> None:
    result = subprocess.run(
        [kubellm_executable(), "operator", "--standalone"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "KUBECONFIG": "/nonexistent/kubeconfig"},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("kubellm operator: no cluster to talk to")
    assert "Traceback" not in result.stderr


def test_the_operator_does_not_import_torch() -> None:
    """The operator image carries no torch: importing the operator must not need it."""
    code = "import sys, kubellm_operator.main, kubellm_operator.handlers; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
