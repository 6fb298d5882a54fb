"""Just enough Dockerfile parsing for the tests: instructions per build stage, COPY sources, exec-form commands."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def last(self, instruction: str) -> str | None:
        found = [args for name, args in self.instructions if name == instruction]
        return found[-1] if found else None


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    parsed = []
    for line in logical:
        name, _, args = line.partition(" ")
        parsed.append((name.upper(), args.strip()))
    return parsed


def stages(path: Path) -> list[Stage]:
    out: list[Stage] = []
    for name, args in instructions(path):
        if name == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.IGNORECASE)
            assert match, f"unparsed FROM {args!r}"
            out.append(Stage(base=match.group(1), name=match.group(2)))
        elif out:
            out[-1].instructions.append((name, args))
    return out


def copy_sources(args: str) -> list[str] | None:
    """Sources of a COPY from the build context; None for COPY --from=<stage> (not the context)."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    flags = [w for w in words if w.startswith("--")]
    if any(flag.startswith("--from") for flag in flags):
        return None
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1]  # the last one is the destination


def exec_form(args: str | None) -> list[str]:
    """ENTRYPOINT/CMD must be JSON exec form: signals reach the process, no shell in between."""
    assert args is not None and args.startswith("["), f"not exec form: {args!r}"
    return json.loads(args)
