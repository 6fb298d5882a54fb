"""A scripted stand-in for LLMEngine, for the tests of what drives it: AsyncEngine's thread
(test_async_engine.py), the engine loops' shared message handler (test_engine_inbox.py) and the engine
process's loop (test_engine_process_loop.py). No model: each step emits the next token of every request."""

from __future__ import annotations

import time
from concurrent.futures import Future

from engine.metrics import EngineMetrics
from engine.outputs import RequestOutput
from engine.sampling.params import SamplingParams
from engine.structured.compiler import GrammarError

BAD_GRAMMAR = "bad-grammar"  # a request id, or a grammar spec, that fails to compile


class ScriptedGrammars:
    """Stands in for the engine's GrammarCompiler: every spec compiles but BAD_GRAMMAR."""

    def submit(self, spec: object) -> Future[None]:
        future: Future[None] = Future()
        if spec == BAD_GRAMMAR:
            future.set_exception(GrammarError("the grammar does not compile"))
        else:
            future.set_result(None)
        return future


class ScriptedLLMEngine:
    """Stands in for LLMEngine: every step emits `per_step` outputs (tokens 1, 2, ...) for each request.
    A request with the id BAD_GRAMMAR is refused as LLMEngine refuses one whose grammar does not compile;
    aborting a running request returns its last output, as LLMEngine's abort does."""

    def __init__(self, per_step: int = 1, step_s: float = 0.0, crash: Exception | None = None) -> None:
        self.per_step, self.step_s, self.crash = per_step, step_s, crash
        self.tokenizer, self.max_model_len, self.vocab_size = None, 64, 128
        self.metrics = EngineMetrics("scripted")
        self.grammars = ScriptedGrammars()
        self.running: dict[str, list[int]] = {}  # request id -> [max_tokens, tokens so far]
        self.aborted: list[str] = []
        self.salts: dict[str, str | None] = {}  # request id -> the cache_salt it was added with
        self.closed = False

    def close(self) -> None:
        self.closed = True

    @property
    def num_waiting(self) -> int:
        return 0

    def add_request(
        self, request_id: str, prompt: list[int], params: SamplingParams, cache_salt: str | None = None
    ) -> None:
        if request_id == BAD_GRAMMAR:
            raise GrammarError("the grammar does not compile")
        self.running[request_id] = [params.max_tokens, 0]
        self.salts[request_id] = cache_salt

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.aborted.append(request_id)
        state = self.running.pop(request_id, None)
        if state is None:
            return None
        return output(request_id, state[1], finished=True, reason="abort", new_token_ids=[])

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        if self.crash is not None:
            raise self.crash
        outputs = []
        for request_id, state in list(self.running.items()):
            for _ in range(self.per_step):
                state[1] += 1
                finished = state[1] == state[0]
                outputs.append(output(request_id, state[1], finished))
                if finished:
                    del self.running[request_id]
                    break
        return outputs


def output(
    request_id: str,
    token: int,
    finished: bool,
    reason: str = "length",
    new_token_ids: list[int] | None = None,
) -> RequestOutput:
    new = [token] if new_token_ids is None else new_token_ids
    return RequestOutput(
        request_id=request_id,
        new_token_ids=new,
        new_text="".join(f"<{t}>" for t in new),
        new_logprobs=None,
        finished=finished,
        finish_reason=reason if finished else None,
        stop_reason=None,
        num_prompt_tokens=2,
        num_output_tokens=token,
        num_cached_tokens=0,
    )
