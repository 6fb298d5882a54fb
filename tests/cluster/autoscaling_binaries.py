"""Where the autoscaling stack's binaries live: KEDA (operator, metrics adapter, CRDs; only the scalers the
tests use) and Prometheus (Kubernetes service discovery only), built once from Go modules by
build_autoscaling.sh (`make cluster-build`) into ~/.cache/kubellm/autoscaling."""

import os
from dataclasses import dataclass
from pathlib import Path

BUILD_SCRIPT = Path(__file__).with_name("build_autoscaling.sh")
# The same defaults as build_autoscaling.sh: a version bump changes both.
KEDA_VERSION = os.environ.get("KEDA_VERSION", "v2.21.0")
PROMETHEUS_VERSION = os.environ.get("PROMETHEUS_VERSION", "v0.316.0")


@dataclass(frozen=True)
class AutoscalingBinaries:
    root: Path  # ~/.cache/kubellm/autoscaling

    @classmethod
    def default(cls) -> "AutoscalingBinaries":
        cache = Path(os.environ.get("KUBELLM_CACHE", Path.home() / ".cache" / "kubellm"))
        return cls(cache / "autoscaling")

    @property
    def keda_dir(self) -> Path:
        return self.root / f"keda-{KEDA_VERSION}-slim"

    @property
    def keda_operator(self) -> Path:
        return self.keda_dir / "keda-operator"

    @property
    def keda_adapter(self) -> Path:
        return self.keda_dir / "keda-adapter"

    @property
    def keda_crds(self) -> list[Path]:
        return sorted((self.keda_dir / "crds").glob("*.yaml"))

    @property
    def prometheus(self) -> Path:
        return self.root / f"prometheus-{PROMETHEUS_VERSION}-k8s-sd" / "prometheus"

    def missing(self) -> list[str]:
        absent = [
            str(path)
            for path in (self.keda_operator, self.keda_adapter, self.prometheus)
            if not os.access(path, os.X_OK)
        ]
        if not (self.keda_dir / "crds" / "keda.sh_scaledobjects.yaml").is_file():
            absent.append(str(self.keda_dir / "crds" / "keda.sh_scaledobjects.yaml"))
        return absent
