"""Tuned fused-MoE block configurations: what bench/fused_moe_tune.py --save-configs writes is what the engine's
MoE layers read (engine/kernels/moe_tuned_configs.py), each call takes the configuration of the nearest tuned
token count, $KUBELLM_MOE_CONFIG_DIR comes before the files kept in the repo, and a file that cannot serve
its variant is a startup error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.kernels import fused_moe_layer
from engine.kernels.fused_moe import MoeBlockConfig
from engine.kernels.moe_tuned_configs import (
    CONFIG_DIR,
    CONFIG_DIR_ENV,
    TunedConfigFile,
    TunedMoeConfigs,
    file_name,
    load_tuned_configs,
    tuned_configs_for,
    variant_name,
)
from engine.model.fp8 import FP8
from engine.model.moe import MoeSpec
from tests.bench_modules import load_bench_module

DEVICE = "NVIDIA H200"
SHAPE = dict(num_experts=128, inter=768, hidden=2048)


tune = load_bench_module("fused_moe_tune")


def cfg(block_m: int, block_k: int = 128, stages: int = 4) -> dict:
    return vars(MoeBlockConfig(block_m, 64, block_k, 1, 4, stages))


def bench_result(rows: list[dict]) -> dict:
    """What bench/fused_moe_tune.py accumulates, for the Qwen3-30B-A3B layer on an H200."""
    return {"device": DEVICE, "date": "2026-12-06", "torch": "2.11.0",
            "shape": {"experts": 128, "top_k": 8, "hidden": 2048, "inter": 768}, "rows": rows}  # fmt: skip


def block_experts() -> object:
    w = torch.zeros(2, 4, 128, dtype=FP8)
    return tune.Experts(
        w, w, {"w13_scale": torch.ones(2, 4, 1), "w2_scale": torch.ones(2, 4, 1), "group_k": 128}
    )


def test_the_bench_writes_the_fastest_per_token_count_and_the_engine_reads_it(tmp_path, monkeypatch):
    rows = [
        {"tokens": 1, "fp8-block": {"default": cfg(16), "default_us": 50.0, "best": cfg(16, stages=3), "best_us": 40.0}},
        {"tokens": 256, "fp8-block": {"default": cfg(16), "default_us": 90.0, "best": cfg(32), "best_us": 95.0}},
        {"tokens": 8192, "fp8-block": {"default": cfg(64), "default_us": None, "best": cfg(128), "best_us": 900.0}},
    ]  # fmt: skip
    path = tune.save_configs(tmp_path, bench_result(rows), "fp8-block", block_experts())
    assert path is not None
    assert path.name == "E=128,N=768,H=2048,device=NVIDIA_H200,variant=fp8-block128.json"
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    tuned = load_tuned_configs(DEVICE, **SHAPE, variant="fp8-block128", group_k=128)
    assert tuned is not None and tuned.path == path and tuned.token_counts == (1, 256, 8192)
    assert tuned.pick(1) == MoeBlockConfig(**cfg(16, stages=3))  # the sweep's best: faster than the default
    assert tuned.pick(200) == MoeBlockConfig(**cfg(16))  # the default: the sweep found nothing faster
    assert tuned.pick(8192) == MoeBlockConfig(**cfg(128))  # the default failed to run
    assert tuned.pick(128) == tuned.pick(1)  # nearest count: 127 from 1, 128 from 256
    assert tuned.pick(4000) == tuned.pick(256) and tuned.pick(5000) == tuned.pick(8192)


def test_the_split_gate_is_swept_from_a_few_slots_an_expert_and_kept_in_the_file(tmp_path, monkeypatch):
    """MoeBlockConfig.split_gate: the sweep tries it where experts get more than a few slots each (64-row
    tiles from 16 slots an expert, larger at prefill sizes), the file keeps it, and a file written before
    the field existed reads as the fused gate. Decode sizes also try 64-row tiles with the gate fused."""
    experts = block_experts()
    assert not any(c.split_gate for c in tune.candidates(64 * 8, 128, experts))  # 4 slots an expert
    decode = tune.candidates(256 * 8, 128, experts)  # 16 slots an expert
    assert {c.block_m for c in decode if c.split_gate} == {64}
    assert {c.block_m for c in decode if not c.split_gate} == {16, 32, 64}
    split = [c for c in tune.candidates(8192 * 8, 128, experts) if c.split_gate]
    assert split and all(c.block_k == 128 and c.block_m >= 64 for c in split)
    assert {c.block_m for c in split} == {64, 128}
    rows = [{"tokens": 8192, "fp8-block": {"default": cfg(64), "default_us": 900.0, "best": vars(split[-1]),
                                           "best_us": 700.0}}]  # fmt: skip
    (tmp_path / "new").mkdir()
    tune.save_configs(tmp_path / "new", bench_result(rows), "fp8-block", experts)
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "new"))
    tuned = load_tuned_configs(DEVICE, **SHAPE, variant="fp8-block128", group_k=128)
    assert tuned is not None and tuned.pick(8192) == split[-1]
    older = {k: v for k, v in cfg(64).items() if k != "split_gate"}
    (tmp_path / "old").mkdir()
    name = file_name(DEVICE, 128, 768, 2048, "fp8-block128")
    (tmp_path / "old" / name).write_text(json.dumps({"device": DEVICE, **SHAPE, "variant": "fp8-block128",
                                                     "configs": {"8192": older}}))  # fmt: skip
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "old"))
    tuned = load_tuned_configs(DEVICE, **SHAPE, variant="fp8-block128", group_k=128)
    assert (
        tuned is not None and tuned.pick(8192) == MoeBlockConfig(**cfg(64)) and not tuned.pick(1).split_gate
    )


def test_nearest_token_count_ties_go_to_the_smaller():
    tuned = TunedConfigFile(device=DEVICE, **SHAPE, variant="bf16", configs={16: cfg(16), 48: cfg(32)})
    table = TunedMoeConfigs((16, 48), tuple(c.as_config() for c in tuned.configs.values()), Path("unused"))
    assert table.pick(32) == MoeBlockConfig(**cfg(16))
    assert table.pick(33) == MoeBlockConfig(**cfg(32))


def test_the_environment_directory_comes_first_then_the_repository(tmp_path, monkeypatch):
    name = file_name(DEVICE, 128, 768, 2048, "bf16")
    (tmp_path / name).write_text(
        TunedConfigFile(device=DEVICE, **SHAPE, variant="bf16", configs={1: cfg(32, 64)}).model_dump_json()
    )
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    tuned = load_tuned_configs(DEVICE, **SHAPE, variant="bf16")
    assert tuned is not None and tuned.path == tmp_path / name
    assert load_tuned_configs("A card never tuned", **SHAPE, variant="bf16") is None
    monkeypatch.delenv(CONFIG_DIR_ENV)
    repo_file = CONFIG_DIR / name
    assert (load_tuned_configs(DEVICE, **SHAPE, variant="bf16") is None) == (not repo_file.exists())


def test_a_file_that_cannot_serve_its_variant_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    name = file_name(DEVICE, 128, 768, 2048, "fp8-block128")
    (tmp_path / name).write_text(
        TunedConfigFile(
            device=DEVICE, **SHAPE, variant="fp8-block128", configs={1: cfg(16, 256)}
        ).model_dump_json()
    )
    with pytest.raises(ValueError, match=r"fp8-block128\.json: block-scaled FP8 needs block_k = 128"):
        load_tuned_configs(DEVICE, **SHAPE, variant="fp8-block128", group_k=128)
    (tmp_path / name).write_text(json.dumps({"device": DEVICE, **SHAPE, "variant": "fp8-block128",
                                             "configs": {"1": {**cfg(16), "block_n": 48}}}))  # fmt: skip
    with pytest.raises(ValueError, match=r"(?s)fp8-block128\.json.*48 is not a power of two"):
        load_tuned_configs(DEVICE, **SHAPE, variant="fp8-block128", group_k=128)


def test_variant_names():
    assert variant_name(torch.bfloat16, None) == "bf16"
    assert variant_name(FP8, None) == "fp8-channel"
    assert variant_name(FP8, 128) == "fp8-block128"


def test_without_cuda_no_table_is_looked_up(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tuned_configs_for(128, 768, 2048, torch.bfloat16) is None


def test_the_layer_passes_the_tuned_configuration_of_each_call_to_the_kernel(tmp_path, monkeypatch):
    """FusedMoeExperts looks its table up once, when built, for its own rank's shape and dtype; each forward
    hands the kernel the configuration of the nearest tuned token count."""
    spec = MoeSpec(num_experts=4, top_k=2, intermediate_size=64, renormalize=True, sparse_layers=frozenset())
    looked_up = []

    def fake_lookup(num_experts, inter, hidden, weight_dtype, group_k=None):
        looked_up.append((num_experts, inter, hidden, weight_dtype, group_k))
        table = TunedConfigFile(device=DEVICE, num_experts=4, inter=inter, hidden=hidden, variant="bf16",
                                configs={1: cfg(16, 64), 512: cfg(64, 64)})  # fmt: skip
        return TunedMoeConfigs((1, 512), tuple(c.as_config() for c in table.configs.values()), tmp_path)

    calls = []
    monkeypatch.setattr(fused_moe_layer, "tuned_configs_for", fake_lookup)
    monkeypatch.setattr(fused_moe_layer, "fused_experts", lambda *args, **kw: calls.append(args[5]))
    with torch.device("meta"):
        experts = fused_moe_layer.FusedMoeExperts(32, spec, matmul_dtype=torch.bfloat16)
    assert looked_up == [(4, 64, 32, torch.bfloat16, None)]
    ids = torch.zeros(3, 2, dtype=torch.long)
    for tokens in (3, 400):
        experts(torch.zeros(tokens, 32), torch.ones(tokens, 2), ids[:1].expand(tokens, 2))
    assert calls == [MoeBlockConfig(**cfg(16, 64)), MoeBlockConfig(**cfg(64, 64))]


def test_an_h200_without_its_own_file_borrows_the_h100s_and_its_own_comes_first(tmp_path, monkeypatch):
    """The H200 has the H100 SXM's SMs (SAME_SMS): the H100's tuning serves it until its own is measured."""
    h100 = "NVIDIA H100 80GB HBM3"
    for folder, cards in (("both", ((h100, 32), (DEVICE, 64))), ("h100_only", ((h100, 32),))):
        (tmp_path / folder).mkdir()
        for device, block_m in cards:
            (tmp_path / folder / file_name(device, 128, 768, 2048, "bf16")).write_text(
                TunedConfigFile(
                    device=device, **SHAPE, variant="bf16", configs={1: cfg(block_m)}
                ).model_dump_json()
            )
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "both"))
    assert load_tuned_configs(DEVICE, **SHAPE, variant="bf16").pick(1).block_m == 64  # its own
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "h100_only"))
    borrowed = load_tuned_configs(DEVICE, **SHAPE, variant="bf16")
    assert borrowed is not None and borrowed.pick(1).block_m == 32 and "H100" in borrowed.path.name
    assert load_tuned_configs("NVIDIA A100-SXM4-80GB", **SHAPE, variant="bf16") is None  # not the same SMs
    monkeypatch.delenv(CONFIG_DIR_ENV)
    committed = load_tuned_configs(DEVICE, **SHAPE, variant="fp8-block128", group_k=128)
    assert committed is not None and committed.path.parent == CONFIG_DIR  # the repo's H100 file, for W5
