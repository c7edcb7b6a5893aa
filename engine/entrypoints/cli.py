"""The `octavo` command line: `generate` (prompts in, completions out), `chat` (a REPL that
keeps the conversation; reads stdin, so it also works from a pipe) and `serve` (the
OpenAI-compatible server) and `download` (fetch a model ahead of time). Without a model,
generate, chat and serve use the default model (SmolLM2-135M-Instruct, Q4_1 GGUF), fetched into
octavo's cache on first use (octavo.default_model)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from octavo.arg_utils import EngineArgs

# SamplingParams fields that have a flag; unset flags keep the model's defaults.
_SAMPLING_FLAGS = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_tokens": int,
    "min_tokens": int, "seed": int, "n": int, "presence_penalty": float,
    "frequency_penalty": float, "repetition_penalty": float,
}
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(full=argv[0] if argv else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except ValueError as e:           # bad input: say what to change, no traceback
        print(f"octavo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """The console script: main(), then a quick exit. Tearing down the interpreter with torch
    and transformers loaded took about 1.2 s after the work was done; output is flushed and
    atexit handlers (worker shutdown) run first, so nothing is lost by skipping it."""
    import atexit
    import logging
    import os

    try:
        rc = main()
    except SystemExit as e:          # argparse errors and --help
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:               # a closed pipe (octavo generate ... | head)
            pass
    os._exit(rc)


def build_parser(full: str | None = "all") -> argparse.ArgumentParser:
    """The parser. `serve` and `bench` get their own (engine-importing) arguments only when
    `full` names them (or is "all"), so that the other commands start quickly."""
    parser = argparse.ArgumentParser(prog="octavo", description="octavo inference engine")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="{generate,chat,serve,download,bench}")
    gen = sub.add_parser("generate", help="complete prompts and print the completions",
                         description="Complete each PROMPT and print the generated text.")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text")
    _add_sampling_args(gen)
    _add_engine_args(gen)
    gen.set_defaults(handler=run_generate)
    chat = sub.add_parser("chat", help="chat with a model (reads messages from stdin)",
                          description="Interactive chat: each input line is a user message; "
                          "the conversation is kept. /reset starts over, /exit (or end of "
                          "input) quits. Works with piped stdin.")
    chat.add_argument("--system", default=None, help="system message that starts the chat")
    chat.add_argument("--chat-template", default=None,
                      help="chat template (file path or Jinja string) when the model has none")
    _add_sampling_args(chat)
    _add_engine_args(chat)
    chat.set_defaults(handler=run_chat)
    if full in ("serve", "all"):
        _add_serve_parser(sub)
    else:
        sub.add_parser("serve", help="OpenAI-compatible HTTP server for MODEL "
                       "(octavo serve --help lists its options)")
    _add_download_parser(sub)
    if full in ("bench", "all"):
        from octavo.bench.cli import add_bench_subparsers   # `octavo bench ...` (bench/cli.py)
        add_bench_subparsers(sub)
    else:
        sub.add_parser("bench", help="benchmark suites (octavo bench --help lists them)")
    return parser


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset: the model's generation_config, else "
                             "octavo's defaults)")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass, (0, 1]")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 or -1: all)")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability")
    g.add_argument("--max-tokens", type=int, help="tokens to generate (default 16; chat: 256)")
    g.add_argument("--min-tokens", type=int, help="tokens to generate before EOS may stop")
    g.add_argument("--seed", type=int, help="per-request sampling seed")
    g.add_argument("--n", type=int, help="completions per prompt (generate)")
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    # --seed is the sampling seed here, so the engine's is --engine-seed.
    EngineArgs.add_cli_args(p, rename={"seed": "engine-seed"})


def _add_download_parser(sub: Any) -> None:
    dl = sub.add_parser(
        "download", help="fetch a model now (default: the default model) and print its path",
        description="Fetch MODEL, a Hugging Face Hub id, into the Hub cache (only the files "
        "loading needs), or with no MODEL the default model into octavo's cache "
        "($OCTAVO_CACHE_DIR, else $XDG_CACHE_HOME/octavo, else ~/.cache/octavo), and print the "
        "local path. Later runs use the copy without the network.")
    dl.add_argument("model", nargs="?", default=None, metavar="MODEL",
                    help="Hub id (org/name or org/name/FILE.gguf); a local path is only checked")
    dl.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    dl.add_argument("--download-dir", default=None,
                    help="cache directory (default: the Hugging Face cache; octavo's cache for "
                         "the default model)")
    dl.set_defaults(handler=run_download)


def run_download(args: argparse.Namespace) -> int:
    from octavo.model_source import resolve_model
    print(resolve_model(args.model, args.revision, args.download_dir).path)
    return 0


def _add_serve_parser(sub: Any) -> None:
    try:        # the server is optional: imported only to build its arguments
        from octavo.entrypoints.openai.cli_args import add_serve_args
    except ImportError as e:
        serve = sub.add_parser("serve", help="OpenAI-compatible server (not available)",
                               description=f"The OpenAI server is not available: {e}")
        serve.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        serve.set_defaults(handler=lambda args: _unavailable(str(e)))
        return
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server for MODEL",
                           description="Serve MODEL with an OpenAI-compatible API "
                           "(/v1/completions, /v1/chat/completions, /v1/models, ...).")
    add_serve_args(serve)
    serve.set_defaults(handler=run_serve)


def _unavailable(reason: str) -> int:
    print(f"octavo serve: the OpenAI server is not available in this install ({reason})",
          file=sys.stderr)
    return 1


def run_serve(args: argparse.Namespace) -> int:
    from octavo.distributed.external import under_torchrun
    if under_torchrun():
        return _serve_under_torchrun(args)
    from octavo.entrypoints.openai.api_server import run_server
    run_server(args)
    return 0


def _serve_under_torchrun(args: argparse.Namespace) -> int:
    """torchrun started one `octavo serve` per rank: rank 0 serves and drives the others (the
    external launcher's same-script mode would leave ranks 1.. without the requests)."""
    import os

    from octavo.distributed.external import DRIVER_ENV, follow_driver
    from octavo.entrypoints.openai.api_server import run_server

    if args.distributed_executor_backend not in (None, "external_launcher"):
        raise ValueError("under torchrun, octavo serve runs with distributed_executor_backend="
                         f"'external_launcher', not {args.distributed_executor_backend!r}")
    args.distributed_executor_backend = "external_launcher"
    os.environ[DRIVER_ENV] = "1"
    if int(os.environ["RANK"]) == 0:
        run_server(args)
    else:
        follow_driver(EngineArgs.from_cli_args(args).create_engine_config())
    return 0


def make_llm(args: argparse.Namespace) -> Any:
    from octavo import LLM
    return LLM(**EngineArgs.from_cli_args(args).engine_kwargs())


def sampling_params(llm: Any, args: argparse.Namespace, **fallback: Any) -> Any:
    """The model's default SamplingParams with the given flags on top (fallback: values used
    when neither the flags nor the model set them)."""
    from dataclasses import replace
    base = llm.get_default_sampling_params()
    values = {k: v for k, v in fallback.items()
              if getattr(base, k) == getattr(type(base)(), k)}
    values.update({k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k) is not None})
    if args.stop:
        values["stop"] = args.stop
    if args.ignore_eos:
        values["ignore_eos"] = True
    return replace(base, **values)              # validates again: bad flags raise ValueError


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Reject bad sampling flags before the model is loaded."""
    from octavo import SamplingParams
    SamplingParams(**{k: getattr(args, k) for k in _SAMPLING_FLAGS
                      if getattr(args, k) is not None})


def run_generate(args: argparse.Namespace) -> int:
    check_sampling_flags(args)
    llm = make_llm(args)
    params = sampling_params(llm, args)
    outputs = llm.generate(args.prompts, params, use_tqdm=False)
    many = len(outputs) > 1 or params.n > 1
    for i, out in enumerate(outputs):
        for c in out.outputs:
            if many:
                print(f"--- prompt {i}, completion {c.index}: {out.prompt!r}")
            print(out.prompt + c.text if not many else c.text, flush=True)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from octavo.chat_utils import apply_chat_template, encode_chat_prompt, load_chat_template

    check_sampling_flags(args)
    template = load_chat_template(args.chat_template)
    llm = make_llm(args)
    params = sampling_params(llm, args, max_tokens=256)
    if params.n != 1:
        raise ValueError("chat keeps one conversation: use --n 1")
    tokenizer = llm.get_tokenizer()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("octavo chat: /reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        line = _read_line(interactive)
        if line is None or line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        text = apply_chat_template(tokenizer, messages, chat_template=template)
        reply = _stream_reply(llm, text, encode_chat_prompt(tokenizer, text), params)
        messages.append({"role": "assistant", "content": reply})


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None


def _stream_reply(llm: Any, text: str, ids: list[int], params: Any) -> str:
    """Generate one reply, printing text as it arrives."""
    from octavo.llm_engine import next_request_id
    engine = llm.llm_engine
    rid = next_request_id()
    engine.add_request(rid, {"prompt": text, "prompt_token_ids": ids}, params)
    shown = ""
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                new = out.outputs[0].text
                print(new[len(shown):], end="", flush=True)
                shown = new
    except BaseException:
        engine.abort_request(rid)
        raise
    print(flush=True)
    return shown


def _version() -> str:
    from octavo import __version__
    return f"octavo {__version__}"


if __name__ == "__main__":
    run()
