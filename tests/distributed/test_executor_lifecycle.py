"""The multi-process executor's life: a killed worker makes generate raise (naming the rank)
within a bounded time and leaves no process; Ctrl-C on the driver stops its workers; the server
runs with --tensor-parallel-size 2; sizes that do not fit raise ValueError naming the numbers."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from octavo import LLM, SamplingParams
from octavo.config import EngineConfig

GREEDY = SamplingParams(temperature=0, max_tokens=4)


def children(pid: int) -> set[int]:
    """Live child processes of pid (read from /proc), zombies excluded."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    """pid runs (a zombie waiting for its reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


def test_killed_worker_raises_naming_the_rank_and_leaves_no_process(llama_dir):
    before = children(os.getpid())
    llm = LLM(model=llama_dir, dtype="float32", kv_cache_memory=1 << 22, tensor_parallel_size=2)
    executor = llm.llm_engine.executor
    pids = [p.pid for p in executor.procs]
    assert set(pids) <= children(os.getpid())
    assert llm.generate(["Hello"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="worker rank 1 .*(died|gone|closed)"):
        llm.generate(["Hello again"], GREEDY, use_tqdm=False)
    assert time.monotonic() - t0 < 30
    with pytest.raises(RuntimeError, match="workers are shut down"):   # and stays down
        llm.generate(["Hello"], GREEDY, use_tqdm=False)
    # multiprocessing's resource tracker (one per driver, started by the first spawn) may stay
    left = {p for p in children(os.getpid()) - before if "resource_tracker" not in _cmdline(p)}
    assert not left, [(p, _cmdline(p)) for p in left]
    assert not [p for p in pids if alive(p)]


_CTRL_C_DRIVER = textwrap.dedent('''
    import faulthandler, signal, sys
    from octavo import LLM, SamplingParams
    if __name__ == "__main__":
        faulthandler.register(signal.SIGUSR1, all_threads=True)   # the test's dump if it hangs
        # Ctrl-C as in a terminal, even where pytest runs in a background job (`cmd &` in a
        # script), whose children inherit SIGINT ignored and would never see it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        llm = LLM(model=sys.argv[1], dtype="float32", kv_cache_memory=1 << 22,
                  tensor_parallel_size=2)
        print(*[p.pid for p in llm.llm_engine.executor.procs], flush=True)
        while True:   # busy until Ctrl-C
            llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
''')


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_driver_stopped_by_ctrl_c_or_killed_leaves_no_worker(llama_dir, tmp_path, sig):
    # Ctrl-C: the driver's finalizer stops the workers; SIGKILL: they see their parent gone
    script = tmp_path / "driver.py"
    script.write_text(_CTRL_C_DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), llama_dir], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        time.sleep(1.0)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # say where the driver hangs (every thread's stack)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2.0)
            proc.kill()
            pytest.fail(f"the driver did not exit within 60 s of {sig.name}:\n{proc.communicate()[1][-6000:]}")
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in proc.stderr.read()
        assert not _wait_gone(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_healthy(proc, url: str, seconds: float = 300) -> None:
    """Until the server process answers /health with 200; fails if it exits or takes longer."""
    import httpx
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"no /health within {seconds:.0f} s"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)


def test_server_with_tensor_parallel_size_2_answers_a_completion(llama_dir):
    import httpx
    expected = LLM(model=llama_dir, dtype="float32", kv_cache_memory=1 << 22).generate(
        ["The capital of France is"], GREEDY, use_tqdm=False)[0].outputs[0].text
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("octavo")
    cmd = [exe] if exe else [sys.executable, "-m", "octavo.entrypoints.cli"]
    proc = subprocess.Popen(cmd + ["serve", llama_dir, "--host", "127.0.0.1", "--port", str(port),
                                   "--dtype", "float32", "--kv-cache-memory", "4MiB",
                                   "--tensor-parallel-size", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url)
        workers = children(proc.pid)
        res = httpx.post(url + "/v1/completions", timeout=60, json=dict(
            model=llama_dir, prompt="The capital of France is", max_tokens=4, temperature=0))
        assert res.status_code == 200, res.text
        assert res.json()["choices"][0]["text"] == expected
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert workers and not _wait_gone(workers)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tensor_parallel_size=3), "4 attention heads do not divide into tensor_parallel_size=3"),
    (dict(pipeline_parallel_size=3), "2 layers do not divide into pipeline_parallel_size=3"),
    (dict(distributed_executor_backend="ray"), "pip install ray"),
    (dict(distributed_executor_backend="uni", tensor_parallel_size=2), "runs one rank"),
    (dict(distributed_executor_backend="external_launcher", tensor_parallel_size=2),
     "expects torchrun to set"),
])
def test_sizes_and_backends_that_do_not_fit_raise_value_error(llama_dir, kwargs, match, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)         # as if Ray were not installed
    with pytest.raises(ValueError, match=match):
        LLM(model=llama_dir, kv_cache_memory=1 << 22, **kwargs)


def test_kv_heads_that_neither_divide_nor_replicate_raise(tiny_model_factory):
    path = tiny_model_factory("LlamaForCausalLM", num_attention_heads=6, num_key_value_heads=3,
                              hidden_size=96)
    with pytest.raises(ValueError, match="3 KV heads neither divide into nor replicate over "
                                         "tensor_parallel_size=2"):
        LLM(model=path, kv_cache_memory=1 << 22, tensor_parallel_size=2)


def test_pipeline_parallel_on_a_model_without_it_raises(tmp_path):
    # the driver refuses before starting a worker (a per-request state is not split over stages)
    from tiny_models import build_tiny_ssm_model
    path = build_tiny_ssm_model(str(tmp_path / "jamba"), "JambaForCausalLM")
    with pytest.raises(ValueError, match="JambaForCausalLM does not support pipeline parallelism"):
        LLM(model=path, kv_cache_memory=1 << 22, pipeline_parallel_size=2)


def test_a_size_only_the_model_checks_raises_value_error_from_the_workers(tmp_path):
    """A shard a worker cannot build (here: experts of 45 rows over 2 ranks) is the user's
    setting to change: ValueError, as in one process, not a worker failure."""
    from tiny_models import save_tiny_model
    path = save_tiny_model(str(tmp_path / "moe"), "qwen3_moe", "Qwen3MoeForCausalLM",
                           hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=45)
    with pytest.raises(ValueError, match=r"moe intermediate size \(45\) is not divisible"):
        LLM(model=path, kv_cache_memory=1 << 22, tensor_parallel_size=2)


def test_more_gpu_ranks_than_gpus_raise(llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="need 2 GPUs, but this machine has 1"):
        EngineConfig(model=llama_dir, device="cuda", tensor_parallel_size=2)


def test_more_cpu_ranks_than_cores_warn(llama_dir, caplog, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    EngineConfig(model=llama_dir, device="cpu", tensor_parallel_size=2, pipeline_parallel_size=2)
    assert "4 CPU ranks on 2 cores" in caplog.text


_TORCHRUN_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from octavo import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", kv_cache_memory=1 << 22,
              tensor_parallel_size=2, distributed_executor_backend="external_launcher")
    outs = llm.generate(["The capital of France is", "A"],
                        SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump([o.outputs[0].token_ids for o in outs], f)
    llm.llm_engine.executor.shutdown()
''')


def test_external_launcher_under_torchrun_matches_single_process(llama_dir, tmp_path):
    import json
    expected = [o.outputs[0].token_ids for o in LLM(
        model=llama_dir, dtype="float32", kv_cache_memory=1 << 22).generate(
        ["The capital of France is", "A"], SamplingParams(temperature=0, max_tokens=4),
        use_tqdm=False)]
    script = tmp_path / "run.py"
    script.write_text(_TORCHRUN_SCRIPT)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                          str(script), llama_dir, str(tmp_path)],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):     # every rank ran the same scheduler and sampled the same tokens
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_serve_under_torchrun_rank0_serves_and_drives(llama_dir, tp, pp):
    """`torchrun --nproc-per-node 2 -m octavo.entrypoints.cli serve ...`: rank 0 answers HTTP
    and sends each step to rank 1; the completions are the single-process engine's; stopping
    torchrun leaves no rank behind."""
    import httpx
    prompts = ["The capital of France is", "A", "one two three four five six"]
    expected = [o.outputs[0].text for o in LLM(
        model=llama_dir, dtype="float32", kv_cache_memory=1 << 22).generate(
        prompts, GREEDY, use_tqdm=False)]
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         "-m", "octavo.entrypoints.cli", "serve", llama_dir, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--kv-cache-memory", "4MiB",
         "-tp", str(tp), "-pp", str(pp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url)
        ranks = children(proc.pid)
        for prompt, text in zip(prompts, expected):    # one after another, then two at once
            res = httpx.post(url + "/v1/completions", timeout=60, json=dict(
                model=llama_dir, prompt=prompt, max_tokens=GREEDY.max_tokens, temperature=0))
            assert res.status_code == 200, res.text
            assert res.json()["choices"][0]["text"] == text
        res = httpx.post(url + "/v1/completions", timeout=60, json=dict(
            model=llama_dir, prompt=prompts[:2], max_tokens=GREEDY.max_tokens, temperature=0))
        assert [c["text"] for c in sorted(res.json()["choices"], key=lambda c: c["index"])] == \
            expected[:2]
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    assert len(ranks) >= 2 and not _wait_gone(ranks)


def test_ray_backend_matches_single_process_and_names_a_dead_rank(llama_dir):
    """distributed_executor_backend="ray": one actor per rank on a local Ray instance; greedy ids
    of one process; an actor that dies makes the next step raise naming its rank."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    from octavo.distributed.mp_executor import WorkerError

    prompts = ["The capital of France is", "A", "one two three four five six"]
    expected = [o.outputs[0].token_ids for o in LLM(
        model=llama_dir, dtype="float32", kv_cache_memory=1 << 22).generate(
        prompts, GREEDY, use_tqdm=False)]
    llm = LLM(model=llama_dir, dtype="float32", kv_cache_memory=1 << 22,
              tensor_parallel_size=2, distributed_executor_backend="ray")
    executor = llm.llm_engine.executor
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert got == expected
        ray.kill(executor.actors[1])
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1 failed during a step") as info:
            llm.generate(prompts[:1], GREEDY, use_tqdm=False)
        assert isinstance(info.value.__cause__, WorkerError)
        assert time.monotonic() - t0 < 30
    finally:
        executor.shutdown()
    assert not ray.is_initialized()            # the local instance went with the engine
