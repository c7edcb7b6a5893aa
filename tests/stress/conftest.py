"""Servers for the reliability suite: real `octavo serve` processes on the tiny chat model,
all started at once (their start-ups overlap), bound to 127.0.0.1, killed at the end."""
from __future__ import annotations

import pytest

from octavo.bench.stress import ServerProcess
from stress_faults import FATAL_FAULT, FORWARD_FAULT, MAIN_ARGS, SAMPLE_FAULT


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
