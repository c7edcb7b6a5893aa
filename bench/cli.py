"""`octavo bench {throughput,latency,serve,plot,decode-ceiling,startup,stress}`: registered on the octavo
command line by add_bench_subparsers(subparsers)."""
from __future__ import annotations

import argparse
import importlib

_SUITES = {
    "throughput": ("octavo.bench.throughput", "offline throughput, octavo and/or transformers"),
    "latency": ("octavo.bench.latency", "latency, TTFT and TPOT of one batch"),
    "serve": ("octavo.bench.serve", "online serving against an OpenAI-compatible server"),
    "plot": ("octavo.bench.plot", "plot JSON-lines results into a PNG"),
    "decode-ceiling": ("octavo.bench.decode_ceiling", "batch-1 TPOT of octavo and transformers "
                       "beside the time to stream the active weights once"),
    "startup": ("octavo.bench.startup", "cold start: import, LLM(), generate, serve to /health, "
                "against the torch import floor"),
    "stress": ("octavo.bench.stress", "reliability: streams that leave, fuzz, KV exhaustion "
               "against a real server"),
}


def add_bench_subparsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="benchmark suites (throughput, latency, serve, plot)")
    suites = bench.add_subparsers(dest="bench_suite", metavar="SUITE", required=True)
    for name, (module, help_text) in _SUITES.items():
        sub = suites.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_args(sub)
        sub.set_defaults(handler=_runner(mod, sub))
    return bench


def _runner(mod, parser: argparse.ArgumentParser):
    def run(args: argparse.Namespace) -> int:
        try:
            mod.run(args)
        except ValueError as e:
            parser.error(str(e))
        return 0
    return run


def main(argv: list[str] | None = None) -> int:
    """`python -m octavo.bench.cli SUITE ...` (the same as `octavo bench SUITE ...`)."""
    parser = argparse.ArgumentParser(prog="octavo")
    add_bench_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
