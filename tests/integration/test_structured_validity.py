"""Output under a JSON schema is valid by construction: 200 completions at temperature 1.5 from the
embedded SmolLM2 (a real model, whose own preferences fight the grammar at that temperature), over
schemas with nested objects, arrays, enums, required and optional fields and string patterns. Every
completion that finished parses and validates with `jsonschema`; only a `max_tokens` cut-off (reported as
finish_reason "length") may be incomplete, and those stay rare.

The 200 go in together (n=40 for each of five schemas, all five requests at once), so the engine runs them
as one batch (tests/engine/test_structured_engine.py covers preemption).
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from openai import AsyncOpenAI

PER_SCHEMA = 40
MAX_TOKENS = 160  # outputs run 20-100 tokens

SCHEMAS: dict[str, dict] = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "array": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                },
            }
        },
        "required": ["items"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "in_stock": {"type": "boolean"},
        },
        "required": ["color", "size", "in_stock"],
    },
    "required_and_optional": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 100000},
            "title": {"type": "string", "maxLength": 30},
            "rating": {"type": "number", "minimum": 0, "maximum": 5},
            "comment": {"type": "string", "maxLength": 90},  # past 64: a rule chain, then plain characters
        },
        "required": ["id", "title", "rating"],
    },
    "patterns": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"},
            "code": {"type": "string", "pattern": "^[a-z]{2,4}_[0-9]{1,3}$"},
            "tags": {"type": "array", "items": {"type": "string", "pattern": "^#[a-z]{1,8}$"}, "maxItems": 4},
        },
        "required": ["date", "code", "tags"],
    },
}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~5 minutes on 2 idle cores; a busy CI box needs more
async def test_200_hot_completions_all_validate(launch_kubellm) -> None:
    srv = launch_kubellm(
        "--device", "cpu", "--max-model-len", "1024", "--kv-cache-memory", "640MiB", startup_timeout=600
    )  # fmt: skip
    client = AsyncOpenAI(base_url=srv.api_url, api_key="unused", max_retries=0, timeout=1700)
    model = (await client.models.list()).data[0].id

    async def draw(name: str, schema: dict):
        return await client.chat.completions.create(
            model=model,
            messages=[
                {"role": "user", "content": f"Give me an example {name.replace('_', ' ')} record as JSON."}
            ],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}},
            n=PER_SCHEMA,
            temperature=1.5,
            max_tokens=MAX_TOKENS,
        )

    completions = await asyncio.gather(*(draw(name, schema) for name, schema in SCHEMAS.items()))
    cut = 0
    for (name, schema), completion in zip(SCHEMAS.items(), completions, strict=True):
        assert len(completion.choices) == PER_SCHEMA
        for choice in completion.choices:
            content = choice.message.content or ""
            if choice.finish_reason == "length":
                cut += 1
                assert completion.usage is not None
                continue
            assert choice.finish_reason == "stop", (name, choice)
            # Strict parsing (the default): no raw control character in a string (RFC 8259; what the
            # OpenAI SDK's parse and pydantic require). tests/unit/test_json_string_grammar.py pins it.
            jsonschema.validate(json.loads(content), schema)
    assert cut <= len(SCHEMAS) * PER_SCHEMA // 20, f"{cut} of 200 hit max_tokens={MAX_TOKENS}"
    metrics = srv.get("/metrics")[1]
    print(f"cut by max_tokens: {cut}/200")
    print([line for line in metrics.splitlines() if "preemptions_total" in line and not line.startswith("#")])
