"""What crosses from the engine process to the API process comes out as it went in: every field of a
step's outputs (logprobs, prompt logprobs, stop reasons of both types), and exceptions keep their type
where they can (the API process maps GrammarError and ModelLoadError to their own answers)."""

from __future__ import annotations

import pickle

from engine.engine_process import wire
from engine.outputs import RequestOutput, TokenLogprob
from engine.structured.compiler import GrammarError


def test_step_outputs_round_trip_every_field() -> None:
    outputs = [
        RequestOutput("a", [5, 6], "hi", [TokenLogprob(5, -0.25, [(5, -0.25), (9, -1.5)]), TokenLogprob(6, -0.5)],
                      True, "stop", "</s>", 3, 2, 1, [None, TokenLogprob(7, -2.0, [], 4), TokenLogprob(8, -0.125, [], 1)]),
        RequestOutput("b", [1], "x", None, False, None, None, 10, 1, 0),
        RequestOutput("c", [2], "", None, True, "stop", 2, 1, 1, 0),
    ]  # fmt: skip
    step = wire.decode_step(wire.encode_step(wire.StepOutputs(outputs, num_waiting=4, num_taken=9)))
    assert step.outputs == outputs and (step.num_waiting, step.num_taken) == (4, 9)
    assert isinstance(step.outputs[0].new_logprobs[0], TokenLogprob)
    assert step.outputs[0].new_logprobs[0].top == [(5, -0.25), (9, -1.5)]
    assert step.outputs[2].stop_reason == 2 and step.outputs[0].stop_reason == "</s>"


def test_errors_keep_their_type_or_say_what_they_were() -> None:
    kept = pickle.loads(wire.dumps(wire.dumps_error(GrammarError("bad schema"))))
    assert isinstance(kept, GrammarError) and str(kept) == "bad schema"

    class Local(Exception):  # defined in a function: pickle cannot find it by name
        pass

    replaced = wire.dumps_error(Local("boom"))
    assert isinstance(replaced, RuntimeError) and str(replaced) == "Local: boom"
