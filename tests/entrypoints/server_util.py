"""Run the real OpenAI-compatible server (uvicorn) on a free loopback port, in a thread."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from octavo.entrypoints.openai.api_server import build_app, build_context
from octavo.entrypoints.openai.cli_args import make_arg_parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """`with RunningServer([model_dir, "--dtype", "float32", ...]) as srv:` srv.url, srv.ctx."""

    def __init__(self, argv: list[str], startup_timeout: float = 60.0) -> None:
        self.port = free_port()
        args = make_arg_parser().parse_args([*argv, "--port", str(self.port)])
        self.ctx, self.metrics = build_context(args)
        app = build_app(args, self.ctx, self.metrics)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout

    def __enter__(self) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"the server did not answer /health within {self.startup_timeout}s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.ctx.engine.shutdown()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text (labels matched as given)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    raise KeyError(f"no series {name} {labels} in the metrics")
