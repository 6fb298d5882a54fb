"""Everything besides generation: /health, /metrics, /version, /v1/models[/{id}], /tokenize, /detokenize."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from engine import __version__
from engine.api.body import read_json, validate
from engine.api.errors import engine_dead, model_not_found, shutting_down
from engine.api.prompts import chat_prompt, check_token_ids, encode_text
from engine.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from engine.api.state import STATE


def _json(model: BaseModel) -> web.Response:
    return web.Response(text=model.model_dump_json(), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    # Readiness: 503 while draining on SIGTERM, so Kubernetes stops sending traffic here.
    state = request.app[STATE]
    if state.draining:
        return shutting_down().to_response()
    if not state.engine.is_healthy():
        return engine_dead().to_response()
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[STATE].engine.render_metrics()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


def _model_card(request: web.Request, name: str) -> ModelCard:
    state = request.app[STATE]
    return ModelCard(
        id=name,
        created=state.created,
        root=state.model_root or state.model_name,
        max_model_len=state.engine.max_model_len,
    )


async def list_models(request: web.Request) -> web.Response:
    names = request.app[STATE].model_names
    return _json(ModelList(data=[_model_card(request, name) for name in names]))


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id} (the SDK's models.retrieve); ids may contain '/', as HF names do."""
    name = request.match_info["id"]
    if name not in request.app[STATE].model_names:
        raise model_not_found(name)
    return _json(_model_card(request, name))


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    tokenizer = state.engine.tokenizer
    data = await read_json(request)
    # vLLM's two shapes: {"prompt": ...} or {"messages": [...]} rendered through the chat template.
    if isinstance(data, dict) and "messages" in data:
        chat = validate(TokenizeChatRequest, data)
        state.check_model(chat.model)
        state.check_request_chat_template(chat.chat_template)
        prompt = await state.off_loop(
            chat_prompt,
            tokenizer,
            chat.messages,
            add_generation_prompt=chat.add_generation_prompt,
            continue_final_message=chat.continue_final_message,
            add_special_tokens=chat.add_special_tokens,
            chat_template=chat.chat_template,
            chat_template_kwargs=chat.chat_template_kwargs,
        )
        ids = prompt.token_ids
        want_strs = chat.return_token_strs
    else:
        plain = validate(TokenizeCompletionRequest, data)
        state.check_model(plain.model)
        ids = await state.off_loop(encode_text, tokenizer, plain.prompt, plain.add_special_tokens)
        want_strs = plain.return_token_strs
    strs = await state.off_loop(tokenizer.convert_ids_to_tokens, ids) if want_strs else None
    return _json(
        TokenizeResponse(
            count=len(ids), max_model_len=state.engine.max_model_len, tokens=ids, token_strs=strs
        )
    )


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = validate(DetokenizeRequest, await read_json(request))
    state.check_model(body.model)
    ids = check_token_ids(state.engine.tokenizer, body.tokens, "tokens")
    text = await state.off_loop(state.engine.tokenizer.decode, ids)
    return _json(DetokenizeResponse(prompt=text))
