"""kubellm engine: OpenAI-compatible LLM serving with a paged KV cache and continuous batching.

Importing this package must stay cheap (no torch): the `kubellm` CLI also runs the operator,
whose image has no torch.
"""

__version__ = "0.1.0"
