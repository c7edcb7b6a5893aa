"""Servers for the reliability suite: real `octavo serve` processes on the tiny chat model,
all started at once (their start-ups overlap), bound to 127.0.0.1, killed at the end."""
from __future__ import annotations

import pytest

from octavo.bench.stress import ServerProcess

# Markers that make the main server's engine fail (octavo/fault_injection.py); the fuzz never
# writes them.
FORWARD_FAULT = "@@fault-forward@@"
SAMPLE_FAULT = "@@fault-sample@@"
FATAL_FAULT = "@@fault-fatal@@"
# 32 blocks of 16 tokens (512 B a token for the tiny model in fp32): far too few for the
# streams the tests offer at once, so the scheduler has to preempt.
MAIN_ARGS = ["--dtype", "float32", "--max-model-len", "128", "--block-size", "16",
             "--kv-cache-memory", "256KiB"]


@pytest.fixture(scope="session")
def _servers(chat_model_dir):
    started = {
        "main": ServerProcess(chat_model_dir, MAIN_ARGS, wait=False, env={
            "OCTAVO_FAULT_INJECT": f"forward:{FORWARD_FAULT},sample:{SAMPLE_FAULT}"}),
        "fatal": ServerProcess(chat_model_dir, MAIN_ARGS, wait=False, env={
            "OCTAVO_FAULT_INJECT": f"fatal:{FATAL_FAULT}"}),
    }
    try:
        yield started
    finally:
        for srv in started.values():
            srv.__exit__()


@pytest.fixture(scope="session")
def server(_servers) -> ServerProcess:
    """The shared server: small KV cache, forward/sample faults on their markers only."""
    return _servers["main"].wait_ready()


@pytest.fixture(scope="session")
def fatal_server(_servers) -> ServerProcess:
    """A server whose engine dies on FATAL_FAULT (one test uses it up)."""
    return _servers["fatal"].wait_ready()
