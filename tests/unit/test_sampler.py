"""Sampler behaviour: greedy, truncation, penalties, min_tokens, seeds, distributions, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampling.params import SamplingParams
from engine.sampling.sampler import Sampler, SamplingRow, apply_penalties, seeded_generator

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
EOS = 0


def row(
    params: SamplingParams,
    output: list[int] | None = None,
    prompt: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> SamplingRow:
    return SamplingRow(
        params=params,
        prompt_token_ids=prompt or [],
        output_token_ids=output or [],
        generator=generator,
        eos_token_ids={EOS},
    )


def logits_from_probs(probs: list[float], batch: int, device: str) -> torch.Tensor:
    return torch.tensor(probs, device=device).log().repeat(batch, 1)


def counts_of(token_ids: list[int], vocab_size: int) -> list[int]:
    return torch.bincount(torch.tensor(token_ids), minlength=vocab_size).tolist()


def chi_square(observed: list[int], expected_probs: list[float]) -> float:
    total = sum(observed)
    return sum(
        (o - total * p) ** 2 / (total * p) for o, p in zip(observed, expected_probs, strict=True) if p > 0
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 500, device=device).to(dtype)
    result = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(8)])
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs == [None] * 8


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_one_and_tiny_top_p_are_greedy(device: str) -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 300, device=device)
    expected = logits.argmax(-1).tolist()
    for params in [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)]:
        rows = [row(params) for _ in range(64)]
        assert Sampler()(logits, rows).token_ids == expected


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_stay_greedy_in_a_mixed_batch(device: str) -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 100, device=device)
    rows = [row(SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, top_p=0.9)) for i in range(6)]
    tokens = Sampler()(logits, rows).token_ids
    assert tokens[0::2] == logits.argmax(-1)[0::2].tolist()


def test_sampler_leaves_callers_logits_untouched() -> None:
    logits = torch.randn(3, 50)
    before = logits.clone()
    rows = [
        row(SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3, logprobs=2), output=[1, 2])
        for _ in range(3)
    ]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_one_follows_the_model_distribution(device: str) -> None:
    torch.manual_seed(3)
    probs = [0.4, 0.25, 0.15, 0.1, 0.07, 0.03]
    draws = 6000
    tokens = Sampler()(logits_from_probs(probs, draws, device), [row(SamplingParams())] * draws).token_ids
    # 5 degrees of freedom: chi-square above 20.5 has probability 0.001 under the right distribution.
    assert chi_square(counts_of(tokens, len(probs)), probs) < 20.5


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_sharpens_the_distribution(device: str) -> None:
    torch.manual_seed(4)
    probs = [0.4, 0.3, 0.2, 0.1]
    sharpened = [p**2 for p in probs]  # temperature 0.5 squares probabilities (then renormalise)
    sharpened = [p / sum(sharpened) for p in sharpened]
    draws = 6000
    rows = [row(SamplingParams(temperature=0.5))] * draws
    tokens = Sampler()(logits_from_probs(probs, draws, device), rows).token_ids
    assert chi_square(counts_of(tokens, len(probs)), sharpened) < 16.3  # 3 dof, p = 0.001


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_follow_the_distribution_too(device: str) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    draws = 3000
    rows = [row(SamplingParams(seed=s), generator=seeded_generator(s, device)) for s in range(draws)]
    tokens = Sampler()(logits_from_probs(probs, draws, device), rows).token_ids
    assert chi_square(counts_of(tokens, len(probs)), probs) < 16.3


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_min_p_keep_only_the_allowed_tokens(device: str) -> None:
    torch.manual_seed(5)
    probs = [0.5, 0.3, 0.15, 0.05]
    draws = 4000
    logits = logits_from_probs(probs, draws, device)
    cases = {
        "top_k=2": SamplingParams(top_k=2),
        "top_p=0.7": SamplingParams(
            top_p=0.7
        ),  # 0.5 < 0.7 so token 1 is needed; 0.8 >= 0.7 so token 2 is not
        "min_p=0.5": SamplingParams(min_p=0.5),  # threshold 0.25: tokens 0 and 1
    }
    for name, params in cases.items():
        counts = counts_of(Sampler()(logits, [row(params)] * draws).token_ids, len(probs))
        assert counts[2] == counts[3] == 0, name
        # Renormalised over the survivors: 0.5 / 0.8 and 0.3 / 0.8.
        assert chi_square(counts[:2], [0.625, 0.375]) < 10.8, name  # 1 dof, p = 0.001


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_applies_after_top_k(device: str) -> None:
    torch.manual_seed(6)
    probs = [0.3, 0.3, 0.2, 0.2]
    # top_k=3 renormalises to [0.375, 0.375, 0.25]; top_p=0.5 then keeps tokens 0 and 1.
    tokens = Sampler()(
        logits_from_probs(probs, 2000, device), [row(SamplingParams(top_k=3, top_p=0.5))] * 2000
    )
    counts = counts_of(tokens.token_ids, len(probs))
    assert counts[2] == counts[3] == 0 and min(counts[:2]) > 800


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_tied_at_the_top_k_cut_are_all_kept(device: str) -> None:
    torch.manual_seed(9)
    logits = torch.tensor([3.0, 2.0, 2.0, 1.0], device=device).repeat(2000, 1)
    counts = counts_of(Sampler()(logits, [row(SamplingParams(top_k=2))] * 2000).token_ids, 4)
    assert counts[3] == 0 and min(counts[:3]) > 200


def test_penalties_change_the_right_logits_by_the_right_amounts() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5, 4.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # prompt has tokens 0 and 1; output has token 2 twice and token 3 once; 4 and 5 unseen.
    rows = [row(params, prompt=[0, 1, 1], output=[2, 3, 2])]
    logits = apply_penalties(logits, rows)
    expected = [
        2.0 / 2,  # prompt token, positive: divided by the repetition penalty
        -2.0 * 2,  # prompt token, negative: multiplied; no frequency/presence (prompt only)
        3.0 / 2 - 0.5 * 2 - 0.25,  # output token seen twice
        -1.0 * 2 - 0.5 * 1 - 0.25,  # output token seen once
        0.5,  # unseen: untouched
        4.0,
    ]
    assert logits[0].tolist() == pytest.approx(expected)


def test_penalties_touch_only_the_rows_that_ask() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    rows = [row(SamplingParams(), output=[0, 1]), row(SamplingParams(presence_penalty=1.0), output=[1])]
    assert apply_penalties(logits, rows).tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_changes_the_greedy_choice(device: str) -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]], device=device)
    plain = Sampler()(logits, [row(SamplingParams(temperature=0.0), output=[1])]).token_ids
    penalized = Sampler()(logits, [row(SamplingParams(temperature=0.0, repetition_penalty=1.5), output=[1])])
    assert plain == [1] and penalized.token_ids == [2]


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_masks_eos_and_stop_token_ids_until_reached(device: str) -> None:
    logits = torch.tensor([[9.0, 1.0, 8.0, 7.0]], device=device)  # eos (0) best, then stop token 2
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2])
    assert Sampler()(logits, [row(params, output=[3, 3])]).token_ids == [3]
    assert Sampler()(logits, [row(params, output=[3, 3, 3])]).token_ids == [0]
    # With ignore_eos, eos does not end the sequence, so (as in vLLM) it is not masked.
    ignoring = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert Sampler()(logits, [row(ignoring, output=[3])]).token_ids == [0]


def run_steps(rows_per_step: int, position: int, steps: int, device: str) -> list[int]:
    """Sample `steps` tokens for a seed-42 row placed at `position` among other (seeded and not) rows."""
    torch.manual_seed(1000 + rows_per_step + position)  # the other rows' randomness differs per layout
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=42)
    target = row(params, prompt=[1, 2], generator=seeded_generator(42, device))
    # Other rows with top_p but no top_k change how the batch is truncated (a full sort, not a top-k).
    others = [
        row(
            SamplingParams(temperature=1.0, top_p=0.8 if i % 3 == 0 else 1.0, seed=i if i % 2 else None),
            generator=seeded_generator(i, device) if i % 2 else None,
        )
        for i in range(rows_per_step - 1)
    ]
    # bf16 logits, as models produce them: ties are common, also at the top_k cut.
    step_logits = torch.randn(steps, 256, generator=torch.Generator().manual_seed(7)).to(
        device, torch.bfloat16
    )
    for step in range(steps):
        rows = others[:position] + [target] + others[position:]
        logits = torch.randn(len(rows), 256, device=device).to(torch.bfloat16)
        logits[position] = step_logits[step]
        token = Sampler()(logits, rows).token_ids[position]
        target.output_token_ids.append(token)
    return target.output_token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_reproduces_alone_and_in_any_batch(device: str) -> None:
    alone = run_steps(rows_per_step=1, position=0, steps=12, device=device)
    assert run_steps(rows_per_step=1, position=0, steps=12, device=device) == alone
    assert run_steps(rows_per_step=5, position=3, steps=12, device=device) == alone
    assert run_steps(rows_per_step=9, position=0, steps=12, device=device) == alone
    assert len(set(alone)) > 1  # really sampling, not collapsing to greedy


@pytest.mark.parametrize("device", DEVICES)
def test_different_seeds_give_different_samples(device: str) -> None:
    logits = torch.zeros(1, 1000, device=device)  # uniform: two seeds agreeing 10 times is ~impossible

    def tokens(seed: int) -> list[int]:
        gen = seeded_generator(seed, device)
        return [
            Sampler()(logits, [row(SamplingParams(seed=seed), generator=gen)]).token_ids[0] for _ in range(10)
        ]

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax_with_sorted_alternatives(device: str) -> None:
    torch.manual_seed(8)
    logits = torch.randn(4, 200, device=device).to(torch.bfloat16)
    rows = [
        row(SamplingParams(temperature=0.7, repetition_penalty=1.4, logprobs=5), output=[3, 4]),
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=0.0, logprobs=0)),
        row(SamplingParams(top_k=3, logprobs=2)),
    ]
    result = Sampler()(logits, rows)
    reference = torch.log_softmax(logits.float(), dim=-1).cpu()
    assert result.logprobs[1] is None
    for i, wanted in [(0, 5), (2, 0), (3, 2)]:
        lp = result.logprobs[i]
        assert lp is not None and lp.token_id == result.token_ids[i]
        assert lp.logprob == pytest.approx(reference[i, lp.token_id].item(), abs=1e-5)
        assert len(lp.top) == wanted
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        best = reference[i].topk(wanted) if wanted else None
        if best is not None:
            assert [t for t, _ in lp.top] == best.indices.tolist()
            assert values == pytest.approx(best.values.tolist(), abs=1e-5)
    assert result.token_ids[2] == logits[2].argmax().item()
    assert math.isclose(sum(math.exp(v) for v in reference[0].tolist()), 1.0, rel_tol=1e-4)


def test_empty_batch() -> None:
    result = Sampler()(torch.empty(0, 10), [])
    assert result.token_ids == [] and result.logprobs == []


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_temperature_row_draws_the_same_whatever_its_neighbours_need(device: str) -> None:
    """On a GPU a batch of temperature-only rows takes the fused kernel and a batch with a top_p row
    the general path: a seeded row's tokens must not depend on which one its batch took."""
    step_logits = torch.randn(12, 3000, generator=torch.Generator().manual_seed(9)).to(device)

    def tokens(neighbour: SamplingParams | None) -> list[int]:
        target = row(SamplingParams(temperature=0.8, seed=5), generator=seeded_generator(5, device))
        out = []
        for step in range(12):
            rows = [target] + ([row(neighbour)] if neighbour else [])
            logits = step_logits[step].repeat(len(rows), 1)
            out.append(Sampler()(logits, rows).token_ids[0])
        return out

    alone = tokens(None)
    assert tokens(SamplingParams(temperature=1.0)) == alone
    assert tokens(SamplingParams(temperature=1.0, top_p=0.9)) == alone
    assert tokens(SamplingParams(temperature=0.5, logprobs=2)) == alone
    assert len(set(alone)) > 1


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_logits_sample_as_their_float32_copy(device):
    """On CUDA the LM head hands the sampler bfloat16 logits (engine.model.vocab.LMHead): every path reads
    them as float32 (exactly), so the tokens and logprobs are those of the float32 copy: greedy, plain
    temperature (the fused kernel on CUDA), top-p with logprobs, penalties, seeded."""
    torch.manual_seed(0)
    logits = (torch.randn(6, 300) * 4).to(torch.bfloat16).to(device)
    rows = [
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=0.7, seed=1), generator=seeded_generator(1, device)),
        row(SamplingParams(temperature=0.9, top_p=0.8, logprobs=3, seed=2), generator=seeded_generator(2, device)),
        row(SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=3), output=[5, 7],
            generator=seeded_generator(3, device)),
        row(SamplingParams(temperature=0.0, logprobs=2)),
        row(SamplingParams(temperature=0.5, seed=4), generator=seeded_generator(4, device)),
    ]  # fmt: skip
    from_bf16 = Sampler()(logits, rows)
    for r in rows:  # the same draws again
        if r.generator is not None:
            r.generator.manual_seed(r.params.seed)
    from_fp32 = Sampler()(logits.float(), rows)
    assert from_bf16.token_ids == from_fp32.token_ids
    assert from_bf16.logprobs == from_fp32.logprobs
    plain = [
        row(SamplingParams(temperature=0.7, seed=5), generator=seeded_generator(5, device)) for _ in range(6)
    ]
    first = Sampler()(logits, plain).token_ids
    for r in plain:
        r.generator.manual_seed(5)
    assert first == Sampler()(logits.float(), plain).token_ids
