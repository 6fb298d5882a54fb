"""Tensor parallelism: one process per rank, started by the server (no torchrun).

Rank 0 is the server process: its engine thread schedules and samples, and its ModelRunner tells the
other ranks what to run (driver.py). Ranks 1..N-1 are worker processes that build the same runner over
their slice of the model and repeat each call (worker.py), step by step, from small int64 messages
over a pipe (messages.py); the layers' collectives (all-reduce, the logits' gather) go through
torch.distributed (NCCL on CUDA, gloo on the CPU).
"""
