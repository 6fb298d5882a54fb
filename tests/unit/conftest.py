"""Fixtures shared by the unit tests."""

from tests.unit.tool_serving import serve  # noqa: F401  (a server whose model writes scripted replies)
