"""A chat request made ready to run: its output plan, prompt and engine sub-requests.

Shared by /v1/chat/completions and /v1/responses (which is translated into a chat request first), so
both check, render and constrain a request the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.api.generation import ChoiceResult, SubRequest, fan_out, new_choices
from engine.api.logit_bias import checked_logit_bias
from engine.api.output_plan import OutputPlan, plan_output
from engine.api.prompts import chat_prompt, resolve_max_tokens
from engine.api.protocol import ChatCompletionRequest
from engine.api.state import ServerState
from engine.api.structured_outputs import compile_spec, compiled_structured_spec
from engine.reasoning.token_count import ReasoningTags


@dataclass
class ChatGeneration:
    model: str  # the name responses echo
    plan: OutputPlan
    subs: list[SubRequest]
    reasoning_tags: ReasoningTags | None = None  # with a reasoning parser: usage counts thinking tokens

    @property
    def parses_output(self) -> bool:
        return self.plan.reasoning is not None or self.plan.make_tool_parser is not None

    def new_choices(self) -> dict[int, ChoiceResult]:
        return new_choices(self.subs, self.reasoning_tags)


def apply_plan(subs: list[SubRequest], plan: OutputPlan) -> None:
    for sub in subs:
        if plan.structured is not None:
            sub.params.structured = plan.structured
        if plan.keeps_special_tokens:  # the tool-call markers are special tokens
            sub.params.skip_special_tokens = False


async def prepare_chat(state: ServerState, body: ChatCompletionRequest, request_id: str) -> ChatGeneration:
    engine = state.engine
    model = state.check_model(body.model)
    state.check_request_chat_template(body.chat_template)
    response_format = body.structured_request is not None
    plan = plan_output(
        body.tools, body.effective_tool_choice, body.parallel_tool_calls, state.tool_options, response_format
    )
    prompt = await state.off_loop(
        chat_prompt,
        engine.tokenizer,
        body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        add_special_tokens=body.add_special_tokens,
        chat_template=body.chat_template,
        chat_template_kwargs=body.chat_template_kwargs,
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
    )
    budget = resolve_max_tokens(len(prompt.token_ids), body.output_limit, engine.max_model_len, "messages")
    if plan.structured is None:  # the request's own response_format / structured_outputs / guided_*
        plan.structured = await compiled_structured_spec(engine, body)
    else:  # tool_choice required / named: a grammar over the tools' schemas
        await compile_spec(engine, plan.structured, "tools")
    if plan.structured is not None and plan.reasoning is not None:
        # Every grammar (tools' or the request's own) constrains the answer only: a thinking model
        # must be free to think first, as in vLLM.
        after = not plan.reasoning.closed_in_prompt(prompt.text)
        plan.structured = replace(plan.structured, after_reasoning=after)
    logit_bias = checked_logit_bias(body.logit_bias_ids, engine.vocab_size)
    subs = fan_out(
        request_id, body, [prompt], [budget], body.num_logprobs, body.prompt_logprobs, logit_bias=logit_bias
    )
    apply_plan(subs, plan)
    return ChatGeneration(model, plan, subs, state.reasoning_tags if plan.reasoning else None)
