"""A server whose model writes what a test scripts: real HTTP, real clients, real tokenizer and a
Qwen-style chat template that renders tools, assistant tool calls and tool results.

The tiny models CI can run don't choose tools; a scripted reply (a recorded tool-call string) is how
`tool_choice: auto` and the parsers are tested end to end. The grammar itself is tested against the
real engine (tests/integration/test_tool_calling.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp.test_utils import TestClient, TestServer
from openai import AsyncOpenAI
from prometheus_client import generate_latest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.api.output_plan import ServerToolOptions
from engine.api.server import build_app
from engine.metrics import EngineMetrics
from engine.outputs import RequestOutput
from engine.sampling.params import SamplingParams
from engine.structured.spec import StructuredOutputSpec

MODEL = "scripted"
AUTO = ServerToolOptions("hermes", enable_auto_tool_choice=True)

# Qwen2.5's template, shortened: tools in the system turn, calls as <tool_call> JSON, results as
# <tool_response> in a user turn; enable_thinking=false closes an empty <think> as Qwen3's does.
QWEN_STYLE_TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

# Tools

<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for tool_call in message.tool_calls %}<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""


def qwen_style_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "<think>"]
    tok.train_from_iterator(corpus * 4, trainer)
    # As in Qwen3's tokenizer: the thinking tags are added (not special) tokens, one id each.
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>")
    hf.chat_template = QWEN_STYLE_TEMPLATE
    return hf


@dataclass
class Submitted:
    prompt: str
    params: SamplingParams


@dataclass
class ScriptedEngine:
    """Writes script(prompt text, params) token by token, then stops as at EOS (or at max_tokens)."""

    tokenizer: PreTrainedTokenizerFast
    script: Callable[[str, SamplingParams], str]
    served_model_name: str = MODEL
    max_model_len: int = 4096
    vocab_size: int = 600
    metrics: EngineMetrics = field(default_factory=lambda: EngineMetrics(MODEL))
    submitted: list[Submitted] = field(default_factory=list)

    def is_healthy(self) -> bool:
        return True

    async def render_metrics(self) -> bytes:
        return generate_latest(self.metrics.registry)

    async def compile_grammar(self, spec: StructuredOutputSpec) -> None:
        pass  # the script writes what the grammar would allow; tests check the spec it was given

    def abort(self, request_id: str) -> None:
        pass

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        prompt = self.tokenizer.decode(prompt_token_ids)
        self.submitted.append(Submitted(prompt, params))
        reply = self.tokenizer.encode(self.script(prompt, params), add_special_tokens=False)
        count = min(len(reply), params.max_tokens)
        for i in range(count):
            await asyncio.sleep(0)
            finished = i + 1 == count
            yield RequestOutput(
                request_id=request_id,
                new_token_ids=[reply[i]],
                new_text=self.tokenizer.decode([reply[i]]),
                new_logprobs=None,
                finished=finished,
                finish_reason=("stop" if count == len(reply) else "length") if finished else None,
                stop_reason=None,
                num_prompt_tokens=len(prompt_token_ids),
                num_output_tokens=i + 1,
                num_cached_tokens=0,
            )


class Served:
    def __init__(self, engine: ScriptedEngine, client: TestClient) -> None:
        self.engine, self.client = engine, client
        self.url = str(client.make_url("/v1"))
        self.openai = AsyncOpenAI(base_url=self.url, api_key="unused", max_retries=0)


@pytest.fixture
async def serve() -> AsyncIterator[Callable]:
    clients: list[TestClient] = []

    async def start(script: Callable[[str, SamplingParams], str] | str, options=AUTO) -> Served:
        reply = script if callable(script) else (lambda prompt, params: script)
        engine = ScriptedEngine(qwen_style_tokenizer(), reply)
        client = TestClient(TestServer(build_app(engine, tool_options=options)))
        await client.start_server()
        clients.append(client)
        return Served(engine, client)

    yield start
    for client in clients:
        await client.close()
