"""Polling until something a test or the harness waits for becomes true."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    check: Callable[[], T],
    what: str,
    timeout_s: float = 60.0,
    interval_s: float = 0.25,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Calls `check` until it returns something truthy and returns that. Exceptions of the `ignore` types
    count as "not yet" (their last message ends up in the timeout error); any other exception propagates."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except ignore as error:
            last = error
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}; last result: {last!r}")
        time.sleep(interval_s)
