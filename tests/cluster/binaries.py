"""Where the control plane's binaries live, and building them (once) when they are missing."""

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BUILD_SCRIPT = Path(__file__).with_name("build.sh")
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.34.4")
EXECUTABLES = (
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl", "helm",
)  # fmt: skip


class ClusterToolingMissing(RuntimeError):
    """The binaries are not cached and cannot be built here (no Go or npm)."""


@dataclass(frozen=True)
class ClusterBinaries:
    root: Path  # ~/.cache/kubellm/k8s/<version>

    @classmethod
    def default(cls) -> "ClusterBinaries":
        cache = Path(os.environ.get("KUBELLM_CACHE", Path.home() / ".cache" / "kubellm"))
        return cls(cache / "k8s" / K8S_VERSION)

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def kwok_stages(self) -> Path:
        return self.root / "kwok-stages.yaml"

    def path(self, name: str) -> Path:
        return self.bin_dir / name

    def missing(self) -> list[str]:
        absent = [name for name in EXECUTABLES if not os.access(self.path(name), os.X_OK)]
        if not self.kwok_stages.is_file():
            absent.append(self.kwok_stages.name)
        return absent

    def ensure_built(self, log_path: Path | None = None) -> None:
        """Runs build.sh when anything is missing. Cold, this compiles Kubernetes: tens of minutes."""
        missing = self.missing()
        if not missing:
            return
        tools = [tool for tool in ("go", "npm") if shutil.which(tool) is None]
        if tools:
            raise ClusterToolingMissing(
                f"The local Kubernetes control plane is not built ({', '.join(missing)} missing under "
                f"{self.root}) and {' and '.join(tools)} {'is' if len(tools) == 1 else 'are'} not on PATH. "
                "Install Go >= 1.26 and npm, then run `make cluster-build`."
            )
        env = {**os.environ, "K8S_VERSION": K8S_VERSION, "KUBELLM_CACHE": str(self.root.parent.parent)}
        if log_path is None:
            subprocess.run(["bash", str(BUILD_SCRIPT)], env=env, check=True, stdout=subprocess.DEVNULL)
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            result = subprocess.run(
                ["bash", str(BUILD_SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if result.returncode != 0:
            raise ClusterToolingMissing(f"{BUILD_SCRIPT} failed (exit {result.returncode}); see {log_path}")
