"""Random-weight Hugging Face checkpoints for the GPU tests, with a word-level tokenizer ("t0" .. "tN")
built in code, so nothing has to be downloaded and any vocabulary size works."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers


def word_level_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1")


def save_random_checkpoint(
    config: transformers.PretrainedConfig, path: Path, weight_std: float = 0.2
) -> Path:
    """Weights drawn N(0, weight_std) (decisive logits, so greedy choices are not near-ties), saved in
    float32 with the tokenizer."""
    torch.manual_seed(1234)
    config.eos_token_id = 1
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, weight_std)
    model.save_pretrained(path)
    word_level_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def checkpoint_maker(
    tmp_path_factory, families: dict[str, Callable[[], transformers.PretrainedConfig]]
) -> Callable[[str], Path]:
    """For a module-scoped fixture: family name -> its random checkpoint, written on first use."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = save_random_checkpoint(families[family](), tmp_path_factory.mktemp(family))
        return made[family]

    return make
