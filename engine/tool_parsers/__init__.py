"""Tool calls in model output: one parser per model family's format, and the streaming differ."""
