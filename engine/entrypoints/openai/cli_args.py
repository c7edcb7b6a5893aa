"""Command-line arguments of the OpenAI-compatible server (`octavo serve [MODEL] ...`): the
server's own flags, then EngineArgs'. Light to import (no torch): the CLI builds it."""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from octavo.arg_utils import EngineArgs, parse_bytes

if TYPE_CHECKING:
    from octavo.config import EngineConfig

__all__ = ["add_serve_args", "engine_config", "make_arg_parser", "parse_bytes"]


def _json_list(text: str) -> list[str]:
    value = json.loads(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {text!r}")
    return value


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's arguments and the engine's (EngineArgs; the model is positional, and
    optional: with none, the default model is served)."""
    srv = parser.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: %(default)s, this machine only; "
                          "0.0.0.0 serves every interface)")
    srv.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    srv.add_argument("--root-path", default=None,
                     help="path prefix the app is mounted at behind a proxy (ASGI root_path)")
    srv.add_argument("--served-model-name", nargs="+", default=None,
                     help="model name(s) clients use (default: the model argument)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 routes")
    srv.add_argument("--chat-template", default=None,
                     help="Jinja chat template, or a file holding one (default: the tokenizer's)")
    srv.add_argument("--trust-request-chat-template", action="store_true",
                     help="let requests bring their own chat_template (as vLLM: off by default, "
                          "since a template is a program that can run for ever)")
    srv.add_argument("--response-role", default="assistant",
                     help="role of the generated chat messages (default: %(default)s)")
    srv.add_argument("--allowed-origins", type=_json_list, default=["*"],
                     help="CORS allowed origins, a JSON list")
    srv.add_argument("--allowed-methods", type=_json_list, default=["*"])
    srv.add_argument("--allowed-headers", type=_json_list, default=["*"])
    srv.add_argument("--allow-credentials", action="store_true")
    srv.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                     help="LoRA adapters to serve (needs --enable-lora): name=path, or JSON "
                          "{\"name\": ..., \"path\": ..., \"base_model_name\": ...}; a "
                          "request's \"model\": name selects one")
    srv.add_argument("--uvicorn-log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug", "trace"])
    logs = srv.add_mutually_exclusive_group()
    logs.add_argument("--enable-log-requests", action="store_true",
                      help="accepted for vLLM compatibility, no effect: octavo logs no request "
                           "contents (uvicorn's access log shows each request line)")
    logs.add_argument("--disable-log-requests", action="store_true",
                      help="accepted for vLLM compatibility, no effect (the default already)")
    EngineArgs.add_cli_args(parser, positional_model=True)
    return parser


def make_arg_parser() -> argparse.ArgumentParser:
    return add_serve_args(argparse.ArgumentParser(
        prog="octavo serve", description="OpenAI-compatible server"))


def engine_config(args: argparse.Namespace) -> "EngineConfig":
    return EngineArgs.from_cli_args(args).create_engine_config()
