"""POST /v1/responses: the Responses API, stateless, served by translating it into a chat request.

The answer is read with the same ChoiceOutput as chat (reasoning, text, tool calls) and returned as
output items: a reasoning item, an assistant message, function calls. Streaming sends the typed events
of OpenAI's API (`response.created`, ..., `response.completed`), each with its `sequence_number`.
"""

from __future__ import annotations

import uuid
from contextlib import aclosing
from typing import Any

from aiohttp import web
from pydantic_core import to_json

from engine.api.body import parse_body, validate
from engine.api.chat_generation import ChatGeneration, prepare_chat
from engine.api.choice_output import ChoiceOutput, ParsedChoice
from engine.api.errors import APIError
from engine.api.generation import ChoiceResult, SubRequest, merged_outputs
from engine.api.logprobs import TokenTexts, chat_logprobs
from engine.api.protocol import ChatCompletionRequest, ChatTokenLogprob, ErrorInfo
from engine.api.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTokensDetails,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    SummaryText,
)
from engine.api.state import STATE
from engine.api.streaming import stream_sse
from engine.outputs import RequestOutput


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------- request → chat request


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    for item in body.input:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # parallel calls: one assistant turn
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        # reasoning items from earlier turns are not shown to the model again
    return messages


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
    return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}


def to_chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": _messages(body),
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body),
    }
    if body.num_logprobs is not None:
        chat["logprobs"], chat["top_logprobs"] = True, body.num_logprobs
    if body.tools:
        chat["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in body.tools
        ]
    if body.tool_choice is not None:
        choice = body.tool_choice
        chat["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    if body.reasoning and body.reasoning.effort:
        # Templates that take an effort (gpt-oss) read `reasoning_effort`; others ignore it.
        chat["chat_template_kwargs"] = {"reasoning_effort": body.reasoning.effort}
    return validate(ChatCompletionRequest, chat)


# Chat fields a Responses request is served through, and the Responses fields the client wrote them as:
# an error about one (e.g. a schema that does not compile) names what the client sent.
_RESPONSES_FIELD_NAMES = (
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
)


def in_responses_terms(error: APIError) -> APIError:
    """`error`, raised for the translated chat request, with the request's own field names."""
    message, param = error.info.message, error.info.param
    for chat_name, name in _RESPONSES_FIELD_NAMES:
        message = message.replace(chat_name, name)
        param = param.replace(chat_name, name) if param else param
    info = error.info
    return APIError(error.status, message, info.type, param, info.code)


def _wants_summary(body: ResponsesRequest) -> bool:
    return bool(body.reasoning and (body.reasoning.summary or body.reasoning.generate_summary))


# ---------------------------------------------------------------- output items


def _reasoning_item(item_id: str, text: str, summary: bool, status: str = "completed") -> OutputReasoning:
    return OutputReasoning(
        id=item_id,
        content=[ReasoningText(text=text)],
        summary=[SummaryText(text=text)] if summary else [],  # no summarizer: the summary is the thinking
        status=status,  # type: ignore[arg-type]
    )


def _output_items(
    parsed: ParsedChoice, summary: bool, status: str, logprobs: list[ChatTokenLogprob]
) -> list[OutputItem]:
    items: list[OutputItem] = []
    if parsed.reasoning:
        items.append(_reasoning_item(_new_id("rs"), parsed.reasoning, summary))
    if parsed.content:
        text = OutputText(text=parsed.content, logprobs=logprobs)
        items.append(OutputMessage(id=_new_id("msg"), content=[text], status=status))  # type: ignore[arg-type]
    for call in parsed.tool_calls:
        items.append(
            OutputFunctionCall(id=_new_id("fc"), call_id=call.id, name=call.name, arguments=call.arguments)
        )
    return items


def _usage(result: ChoiceResult) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=result.num_prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=result.num_cached_tokens),
        output_tokens=result.num_output_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=result.num_reasoning_tokens),
        total_tokens=result.num_prompt_tokens + result.num_output_tokens,
    )


def _skeleton(response_id: str, body: ResponsesRequest, model: str) -> ResponseObject:
    return ResponseObject(
        id=response_id,
        model=model,
        status="in_progress",
        instructions=body.instructions,
        tools=body.tools or [],
        tool_choice=body.tool_choice or ("auto" if body.tools else "none"),
        parallel_tool_calls=body.parallel_tool_calls,
        text=body.text.model_dump(by_alias=True, exclude_none=True)
        if body.text
        else {"format": {"type": "text"}},
        reasoning=body.reasoning,
        max_output_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_logprobs=body.top_logprobs,
        metadata=body.metadata,
    )


def _finish(response: ResponseObject, result: ChoiceResult, items: list[OutputItem]) -> ResponseObject:
    incomplete = result.finish_reason == "length"
    return response.model_copy(
        update={
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            "output": items,
            "usage": _usage(result),
        }
    )


# ---------------------------------------------------------------- streaming


class OutputLogprobs:
    """The output tokens' logprobs (`include: ["message.output_text.logprobs"]`) as they arrive: each
    text delta carries those not sent yet (a token whose text is held back goes with the next delta)."""

    def __init__(self, texts: TokenTexts, num_top: int | None) -> None:
        self.texts = texts
        self.num_top = num_top  # None: not asked for
        self.received: list[ChatTokenLogprob] = []
        self.num_sent = 0

    def add(self, out: RequestOutput) -> None:
        if self.num_top is not None and out.new_logprobs:
            self.received += chat_logprobs(self.texts, out.new_logprobs, self.num_top)

    def take_unsent(self) -> list[ChatTokenLogprob]:
        unsent = self.received[self.num_sent :]
        self.num_sent = len(self.received)
        return unsent


class ResponseEvents:
    """The typed event stream: items open when their first delta arrives and close when the next kind
    starts (reasoning, then the message, then function calls) or the output ends."""

    def __init__(
        self,
        response: ResponseObject,
        generation: ChatGeneration,
        sub: SubRequest,
        summary: bool,
        logprobs: OutputLogprobs,
    ) -> None:
        self.response = response
        self.summary = summary
        self.logprobs = logprobs
        self.output = ChoiceOutput(generation.plan, sub.prompt.text) if generation.parses_output else None
        self.result = generation.new_choices()[sub.index]
        self.sequence = 0
        self.items: list[OutputItem] = []
        self.open_kind: str | None = None  # the kind of items[-1] while it is open
        self.text = ""  # the open item's text (reasoning or message) or arguments
        self.call_items: dict[int, int] = {}  # tool-call index -> output index
        self.started = False

    def event(self, type_: str, **fields: Any) -> bytes:
        payload = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + type_.encode() + b"\ndata: " + to_json(payload) + b"\n\n"

    def error_event(self, info: ErrorInfo) -> bytes:
        return self.event("error", code=info.code, message=info.message, param=info.param)

    def _item_fields(self) -> dict[str, Any]:
        return {"item_id": self.items[-1].id, "output_index": len(self.items) - 1}

    def _open(self, kind: str, item: OutputItem) -> list[bytes]:
        events = self._close()
        self.items.append(item)
        self.open_kind, self.text = kind, ""
        events.append(
            self.event("response.output_item.added", output_index=len(self.items) - 1, item=item.model_dump())
        )
        if kind == "message":
            part = OutputText(text="").model_dump()
            events.append(
                self.event("response.content_part.added", **self._item_fields(), content_index=0, part=part)
            )
        return events

    def _close(self) -> list[bytes]:
        if self.open_kind is None:
            return []
        kind, text, fields = self.open_kind, self.text, self._item_fields()
        item = self.items[-1]
        events: list[bytes] = []
        if kind == "reasoning":
            item = _reasoning_item(item.id, text, self.summary)
            events.append(self.event("response.reasoning_text.done", **fields, content_index=0, text=text))
            if self.summary:
                part = {"type": "summary_text", "text": ""}
                events.append(
                    self.event("response.reasoning_summary_part.added", **fields, summary_index=0, part=part)
                )
                events.append(
                    self.event("response.reasoning_summary_text.delta", **fields, summary_index=0, delta=text)
                )
                events.append(
                    self.event("response.reasoning_summary_text.done", **fields, summary_index=0, text=text)
                )
                part = {"type": "summary_text", "text": text}
                events.append(
                    self.event("response.reasoning_summary_part.done", **fields, summary_index=0, part=part)
                )
        elif kind == "message":
            status = "incomplete" if self.result.finish_reason == "length" else "completed"
            logprobs = self.logprobs.received
            content = [OutputText(text=text, logprobs=logprobs)]
            item = OutputMessage(id=item.id, content=content, status=status)  # type: ignore[arg-type]
            done = {"text": text, "logprobs": [lp.model_dump() for lp in logprobs]}
            events.append(self.event("response.output_text.done", **fields, content_index=0, **done))
            part = item.content[0].model_dump()
            events.append(self.event("response.content_part.done", **fields, content_index=0, part=part))
        else:
            assert isinstance(item, OutputFunctionCall)
            item = item.model_copy(update={"arguments": text, "status": "completed"})
            events.append(
                self.event("response.function_call_arguments.done", **fields, name=item.name, arguments=text)
            )
        self.items[-1] = item
        events.append(
            self.event("response.output_item.done", output_index=len(self.items) - 1, item=item.model_dump())
        )
        self.open_kind = None
        return events

    def on_output(self, sub: SubRequest, out: RequestOutput) -> list[bytes]:
        events: list[bytes] = []
        if not self.started:
            self.started = True
            snapshot = self.response.model_dump()
            events.append(self.event("response.created", response=snapshot))
            events.append(self.event("response.in_progress", response=snapshot))
        self.result.count(out)
        self.logprobs.add(out)
        if self.output is None:
            reasoning, content, calls = "", out.new_text, []
        else:
            delta = self.output.feed(out.new_text, out.finished)
            reasoning, content, calls = delta.reasoning, delta.content, delta.tool_calls
        if reasoning:
            if self.open_kind != "reasoning":
                events += self._open("reasoning", OutputReasoning(id=_new_id("rs"), status="in_progress"))
            self.text += reasoning
            events.append(
                self.event(
                    "response.reasoning_text.delta", **self._item_fields(), content_index=0, delta=reasoning
                )
            )
        if content:
            if self.open_kind != "message":
                events += self._open("message", OutputMessage(id=_new_id("msg"), status="in_progress"))
            self.text += content
            fields = self._item_fields()
            logprobs = [lp.model_dump() for lp in self.logprobs.take_unsent()]
            events.append(
                self.event(
                    "response.output_text.delta", **fields, content_index=0, delta=content, logprobs=logprobs
                )
            )
        for call in calls:
            if call.id is not None:
                item = OutputFunctionCall(
                    id=_new_id("fc"),
                    call_id=call.id,
                    name=call.name or "",
                    arguments="",
                    status="in_progress",
                )
                events += self._open("function_call", item)
                self.call_items[call.index] = len(self.items) - 1
            if call.arguments:
                self.text += call.arguments
                events.append(
                    self.event(
                        "response.function_call_arguments.delta", **self._item_fields(), delta=call.arguments
                    )
                )
        if out.finished:
            events += self._close()
            final = _finish(self.response, self.result, self.items)
            events.append(self.event("response.completed", response=final.model_dump()))
        return events

    def final(self) -> list[bytes]:
        return []


# ---------------------------------------------------------------- handler


async def create_response(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await parse_body(request, ResponsesRequest)
    response_id = _new_id("resp")
    try:
        generation = await prepare_chat(state, to_chat_request(body), response_id)
    except APIError as exc:
        raise in_responses_terms(exc) from None
    (sub,) = generation.subs
    skeleton = _skeleton(response_id, body, generation.model)
    summary = _wants_summary(body)

    async with aclosing(merged_outputs(state.engine, generation.subs)) as outputs:
        if body.stream:
            logprobs = OutputLogprobs(state.token_texts, body.num_logprobs)
            events = ResponseEvents(skeleton, generation, sub, summary, logprobs)
            return await stream_sse(
                request, outputs, events, response_id, error_event=events.error_event, terminator=b""
            )
        result = generation.new_choices()[sub.index]
        async for _, out in outputs:
            result.add(out)

    if generation.parses_output:
        parsed = ChoiceOutput(generation.plan, sub.prompt.text).parse(result.text)
    else:
        parsed = ParsedChoice(None, result.text, [])
    status = "incomplete" if result.finish_reason == "length" else "completed"
    logprobs = chat_logprobs(state.token_texts, result.logprobs, body.num_logprobs or 0)
    response = _finish(skeleton, result, _output_items(parsed, summary, status, logprobs))
    return web.Response(text=response.model_dump_json(), content_type="application/json")
