"""A server whose model writes what a test scripts (the engine is tests/unit/fake_engine.py): real HTTP,
real clients, real tokenizer and a Qwen-style chat template that renders tools, assistant tool calls and
tool results.

The tiny models CI can run don't choose tools; a scripted reply (a recorded tool-call string) is how
`tool_choice: auto` and the parsers are tested end to end. The grammar itself is tested against the
real engine (tests/integration/test_tool_calling.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from openai import AsyncOpenAI
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.api.output_plan import ServerToolOptions
from engine.api.server import build_app
from engine.structured.compiler import GrammarCompiler
from tests.unit.fake_engine import FakeEngine, Script

MODEL = "scripted"
AUTO = ServerToolOptions("hermes", enable_auto_tool_choice=True)

# Qwen2.5's template, shortened: tools in the system turn, calls as <tool_call> JSON, results as
# <tool_response> in a user turn; as Qwen3's, enable_thinking=false closes an empty <think>, and a tool-calling
# turn's `reasoning_content` is shown again (interleaved thinking).
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
{% if message.reasoning_content is string %}<think>
{{ message.reasoning_content }}
</think>

{% endif %}{% if message.content %}{{ message.content }}
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


class Served:
    def __init__(self, engine: FakeEngine, client: TestClient) -> None:
        self.engine, self.client = engine, client
        self.url = str(client.make_url("/v1"))
        self.openai = AsyncOpenAI(base_url=self.url, api_key="unused", max_retries=0)


@pytest.fixture
async def serve() -> AsyncIterator[Callable]:
    clients: list[TestClient] = []

    compilers: list[GrammarCompiler] = []

    async def start(script: Script, options=AUTO, compile_grammars: bool = False) -> Served:
        """compile_grammars: structured output specs are compiled by xgrammar as the engine does."""
        tokenizer = qwen_style_tokenizer()
        engine = FakeEngine(tokenizer, script, served_model_name=MODEL, vocab_size=600)
        if compile_grammars:
            engine.grammars = GrammarCompiler(tokenizer, 600, [tokenizer.eos_token_id], max_workers=1)
            compilers.append(engine.grammars)
        client = TestClient(TestServer(build_app(engine, tool_options=options)))
        await client.start_server()
        clients.append(client)
        return Served(engine, client)

    yield start
    for client in clients:
        await client.close()
    for compiler in compilers:
        compiler.shutdown()
