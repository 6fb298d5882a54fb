"""Grammar-constrained decoding (structured outputs): what a request asks for, compiled off the engine loop."""
