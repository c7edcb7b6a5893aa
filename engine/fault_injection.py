"""A test-only hook that makes engine steps fail on demand, so the reliability suite can check
what a failure inside a step does to the engine and the server.

`OCTAVO_FAULT_INJECT=KIND:MARKER[,KIND:MARKER...]` raises in every step that holds a request
whose prompt text contains MARKER:
  forward  in the model forward, which fails the whole step (it cannot be pinned on a request);
  sample   in that request's sampling, which fails only that request;
  fatal    in the model forward, with an error marked fatal (as a broken device would be).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

ENV = "OCTAVO_FAULT_INJECT"
KINDS = ("forward", "sample", "fatal")


class InjectedFault(RuntimeError):
    """The error OCTAVO_FAULT_INJECT raises; `fatal` marks one the engine must not survive."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


@dataclass(frozen=True)
class FaultInjector:
    rules: tuple[tuple[str, str], ...]          # (kind, marker)

    @classmethod
    def from_env(cls) -> "FaultInjector | None":
        spec = os.environ.get(ENV, "")
        if not spec:
            return None
        rules = []
        for rule in spec.split(","):
            kind, sep, marker = rule.partition(":")
            if kind not in KINDS or not sep or not marker:
                raise ValueError(f"{ENV}={spec!r}: expected KIND:MARKER[,KIND:MARKER...] with "
                                 f"KIND one of {KINDS}")
            rules.append((kind, marker))
        return cls(tuple(rules))

    def _hit(self, kinds: tuple[str, ...], req) -> str | None:
        for kind, marker in self.rules:
            if kind in kinds and marker in (req.prompt or ""):
                return kind
        return None

    def before_forward(self, requests: Iterable) -> None:
        for req in requests:
            kind = self._hit(("forward", "fatal"), req)
            if kind is not None:
                raise InjectedFault(f"injected {kind} fault ({ENV})", fatal=kind == "fatal")

    def before_sample(self, req) -> None:
        if self._hit(("sample",), req) is not None:
            raise InjectedFault(f"injected sampling fault for request {req.request_id} ({ENV})")
