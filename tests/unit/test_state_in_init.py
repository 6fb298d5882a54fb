"""A class's whole state is visible in its `__init__` (DESIGN.md): every attribute the engine's core
classes assign anywhere is first assigned, typed or commented, in `__init__`, so a reader of `__init__`
knows everything an instance holds (no state appears later from another method or thread)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from engine.async_engine import AsyncEngine
from engine.core.block_pool import BlockPool
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.core.step_cost_model import StepCostModel
from engine.core.step_pipeline import StepPipeline
from engine.engine_inbox import InboxHandler
from engine.engine_process.core import EngineLoop
from engine.llm_engine import LLMEngine
from engine.model.runner import ModelRunner
from engine.model.step_timer import StepTimer
from engine.request_streams import StreamingFrontend


def self_assignments(func: ast.FunctionDef) -> set[str]:
    names = set()
    for node in ast.walk(func):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            for t in ast.walk(target) if target is not None else []:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    if isinstance(t.ctx, ast.Store):
                        names.add(t.attr)
    return names


def class_methods(cls: type) -> list[ast.FunctionDef]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return [n for n in tree.body[0].body if isinstance(n, ast.FunctionDef)]


@pytest.mark.parametrize(
    "cls",
    [
        StreamingFrontend,
        AsyncEngine,
        EngineLoop,
        InboxHandler,
        LLMEngine,
        StepPipeline,
        Scheduler,
        KVCacheManager,
        BlockPool,
        Sequence,
        ModelRunner,
        StepCostModel,
        StepTimer,
    ],
    ids=lambda c: c.__name__,
)
def test_every_attribute_is_assigned_in_init(cls: type) -> None:
    methods = class_methods(cls)
    # A base class's __init__ counts: it runs first (super().__init__), within the subclass's.
    in_init = set().union(
        *(
            self_assignments(m)
            for base in cls.__mro__[:-1]
            for m in class_methods(base)
            if m.name == "__init__"
        )
    )
    later = {(m.name, a) for m in methods if m.name != "__init__" for a in self_assignments(m) - in_init}
    assert not later, f"{cls.__name__}: attributes first assigned outside __init__: {sorted(later)}"
