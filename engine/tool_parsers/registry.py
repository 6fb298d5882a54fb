"""Tool-call parsers by the names vLLM's `--tool-call-parser` uses."""

from __future__ import annotations

from engine.tool_parsers.base import ToolParser
from engine.tool_parsers.hermes import HermesToolParser
from engine.tool_parsers.llama3_json import Llama3JsonToolParser
from engine.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}


def tool_parser(name: str) -> ToolParser:
    return TOOL_PARSERS[name]()
