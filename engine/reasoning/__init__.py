"""Reasoning (thinking) sections in model output, split from the answer (`--reasoning-parser`)."""
