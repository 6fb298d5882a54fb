"""The aiohttp application: routes, and the middlewares every request passes through."""

from __future__ import annotations

from aiohttp import web

from engine.api import chat, completions, misc, responses
from engine.api.auth import auth_middleware
from engine.api.errors import Handler, error_middleware, shutting_down
from engine.api.output_plan import ServerToolOptions
from engine.api.state import STATE, ServerState, ServingEngine

MAX_BODY_BYTES = 64 * 2**20  # long prompts as token ids are big JSON; aiohttp's default is 1 MiB


@web.middleware
async def refuse_while_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
    # After SIGTERM, requests already running finish; new ones (keep-alive connections) get 503.
    if request.app[STATE].draining and request.path not in ("/health", "/metrics"):
        raise shutting_down()
    return await handler(request)


async def _stop_tokenizer_pool(app: web.Application) -> None:
    app[STATE].tokenizer_pool.shutdown(wait=False, cancel_futures=True)


def build_app(
    engine: ServingEngine,
    *,
    api_key: str | None = None,
    served_model_names: list[str] | None = None,
    model_root: str | None = None,
    trust_request_chat_template: bool = False,
    tool_options: ServerToolOptions | None = None,
) -> web.Application:
    """The OpenAI-compatible server for `engine` (an AsyncEngine, already started by the caller).

    served_model_names: names clients may use in `model` (default: the engine's); the first is echoed.
    """
    state = ServerState(
        engine=engine,
        model_names=served_model_names or [engine.served_model_name],
        api_key=api_key,
        model_root=model_root,
        trust_request_chat_template=trust_request_chat_template,
        tool_options=tool_options or ServerToolOptions(),
    )
    # Order matters: errors is outermost so 401/503 raised below are rendered as OpenAI JSON too.
    middlewares = [error_middleware, refuse_while_draining]
    if api_key:
        middlewares.append(auth_middleware(api_key))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.on_cleanup.append(_stop_tokenizer_pool)
    app.router.add_get("/health", misc.health)
    app.router.add_get("/metrics", misc.metrics)
    app.router.add_get("/version", misc.version)
    app.router.add_get("/v1/models", misc.list_models)
    app.router.add_get("/v1/models/{id:.+}", misc.retrieve_model)
    app.router.add_post("/tokenize", misc.tokenize)
    app.router.add_post("/detokenize", misc.detokenize)
    app.router.add_post("/v1/completions", completions.create_completion)
    app.router.add_post("/v1/chat/completions", chat.create_chat_completion)
    app.router.add_post("/v1/responses", responses.create_response)
    return app
