"""The engine loop in a process of its own (`kubellm serve --engine-process`): client.py is the API
process's side (ProcessEngine), core.py the engine process's, wire.py what crosses between them."""
