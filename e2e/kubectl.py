"""kubectl against one cluster, printing each command: the scenario reads like a user's terminal."""

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class KubectlFailed(RuntimeError):
    pass


@dataclass
class Kubectl:
    """kubectl against one cluster; every step of the scenario is a command a user could type."""

    binary: str
    env: dict[str, str]

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout_s: float = 120
    ) -> str:
        print("$ kubectl", " ".join(args))
        result = subprocess.run(
            [self.binary, *args], input=input, capture_output=True, text=True, env=self.env, timeout=timeout_s
        )
        if check and result.returncode != 0:
            raise KubectlFailed(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))
