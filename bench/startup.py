"""Cold-start suite: how long a new process takes to be useful, against the floor under it.

Each case runs as a fresh process, `--runs` times, alternating cases run by run so that a
change in machine load hits all of them alike:
  torch      `python -c "import torch"`: the floor every octavo command stands on
  imports    `from octavo import LLM` resolved (torch, transformers' top level, octavo)
  llm        imports + `LLM(model)` ready (config, tokenizer, weights, KV cache)
  first      `LLM(model)` and its first generated token (a one-token greedy generate of PROMPT);
             besides the whole process, its row reports when the token was there, counted from
             the process's spawn (`to_token`: what a user waits for; the rest is the interpreter
             tearing torch down, ~0.5 s that no octavo code runs in) and from the `LLM(model)`
             call (`llm_to_token`: the cold start as the CPU-speed issue defines it)
  generate   `octavo generate PROMPT` (the console script, whole process, 16 tokens)
  serve      `octavo serve` until `/health` answers 200 (then the server is stopped)
Medians and each case's ratio to the torch floor are printed (and written as JSON lines with
`--output`). Without `--model`, the default model is used (fetched once, before timing).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

CASES = ("torch", "imports", "llm", "first", "generate", "serve")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model (default: the default model)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--runs", type=int, default=3, help="runs of each case")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--serve-timeout", type=float, default=300.0,
                        help="seconds to wait for /health before giving up on a serve run")
    parser.add_argument("--output", default=None, help="append JSON lines here")


def _octavo(*args: str) -> list[str]:
    # The console script's own entry point (octavo.entrypoints.cli:run), as `octavo ...` runs it.
    return [sys.executable, "-c", "import sys; from octavo.entrypoints.cli import run; "
            "sys.argv[0] = 'octavo'; run()", *args]


_STAMP = "OCTAVO_STARTUP_FIRST_TOKEN"     # the `first` case's child prints this, then two times


def _timed(cmd: list[str]) -> tuple[float, list[float] | None]:
    """Whole-process seconds, and the wall-clock stamps the child printed after _STAMP (if any)
    made relative to the spawn: [LLM() called, first token there]."""
    wall0 = time.time()
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {proc.returncode}: {proc.stderr[-2000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith(_STAMP):
            return elapsed, [float(x) - wall0 for x in line.split()[1:3]]
    return elapsed, None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_until_healthy(model_args: list[str], timeout: float) -> float:
    port = _free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(_octavo("serve", *model_args, "--host", "127.0.0.1", "--port", str(port)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"octavo serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                pass
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"octavo serve gave no /health within {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _command(case: str, model: str | None, prompt: str) -> list[str]:
    model_args = [] if model is None else ["--model", model]
    llm_arg = "" if model is None else repr(model)
    return {
        "torch": [sys.executable, "-c", "import torch"],
        "imports": [sys.executable, "-c", "from octavo import LLM; LLM"],
        "llm": [sys.executable, "-c", f"from octavo import LLM; LLM({llm_arg})"],
        "first": [sys.executable, "-c", "import time; from octavo import LLM, SamplingParams; "
                  f"t = time.time(); LLM({llm_arg}).generate({prompt!r}, SamplingParams("
                  "max_tokens=1, temperature=0), use_tqdm=False); "
                  f"print({_STAMP!r}, t, time.time(), flush=True)"],
        "generate": _octavo("generate", prompt, *model_args, "--max-tokens", "16",
                            "--temperature", "0"),
    }[case]


def run(args: argparse.Namespace) -> list[dict]:
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    if args.model is None:                      # fetch (once) outside the timed runs
        from octavo.default_model import default_model_path
        default_model_path()
    times: dict[str, list[float]] = {c: [] for c in cases}
    to_token: list[float] = []          # `first`: spawn -> first token
    llm_to_token: list[float] = []      # `first`: LLM() called -> first token
    for _ in range(args.runs):
        for case in cases:
            if case == "serve":
                model_args = [] if args.model is None else ["--model", args.model]
                times[case].append(_serve_until_healthy(model_args, args.serve_timeout))
            else:
                elapsed, stamps = _timed(_command(case, args.model, args.prompt))
                times[case].append(elapsed)
                if case == "first":
                    if stamps is None:
                        raise RuntimeError("the first-token child printed no time stamps")
                    to_token.append(stamps[1])
                    llm_to_token.append(stamps[1] - stamps[0])
    floor = statistics.median(times["torch"]) if "torch" in times else None
    rows = []
    print(f"{'case':<10} {'median s':>9} {'x torch':>8}   runs (s)")
    for case in cases:
        med = statistics.median(times[case])
        ratio = med / floor if floor else None
        row = {"suite": "startup", "case": case, "model": args.model or "default",
               "median_s": med, "runs_s": times[case], "ratio_to_torch_import": ratio,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "load_avg": os.getloadavg()[0]}
        ratio_txt = f"{ratio:8.2f}" if ratio is not None else f"{'-':>8}"
        print(f"{case:<10} {med:9.2f} {ratio_txt}   " + " / ".join(f"{t:.2f}" for t in times[case]))
        if case == "first":
            row.update(to_token_median_s=statistics.median(to_token), to_token_runs_s=to_token,
                       llm_to_token_median_s=statistics.median(llm_to_token),
                       llm_to_token_runs_s=llm_to_token)
            for name, runs in ((" to token", to_token), (" LLM->tok", llm_to_token)):
                print(f"{name:<10} {statistics.median(runs):9.2f} {'':>8}   "
                      + " / ".join(f"{t:.2f}" for t in runs))
        rows.append(row)
    if args.output:
        with open(args.output, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="octavo bench startup", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
