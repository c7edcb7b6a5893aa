"""Tensor and pipeline parallelism on torch.distributed: a worker per rank (worker.py), started
by the multi-process executor (mp_executor.py) or by torchrun (external.py)."""
