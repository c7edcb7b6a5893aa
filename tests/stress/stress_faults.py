"""Fault markers and server arguments of the reliability suite, shared by its conftest and
tests (a module of its own: `from conftest import` would depend on which conftest pytest
imported last)."""

# Markers that make the main server's engine fail (octavo/fault_injection.py); the fuzz never
# writes them.
FORWARD_FAULT = "@@fault-forward@@"
SAMPLE_FAULT = "@@fault-sample@@"
FATAL_FAULT = "@@fault-fatal@@"
# 32 blocks of 16 tokens (512 B a token for the tiny model in fp32): far too few for the
# streams the tests offer at once, so the scheduler has to preempt.
MAIN_ARGS = ["--dtype", "float32", "--max-model-len", "128", "--block-size", "16",
             "--kv-cache-memory", "256KiB"]
