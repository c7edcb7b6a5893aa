"""Run tiny checkpoints on two tensor-parallel ranks (gloo, two CPU processes) and on one.

`two_rank_logits(model_dirs, seqs, workdir)` and `one_rank_logits(model_dir, seqs)` return the
logits of a batched prefill of every sequence but its last token followed by a one-token decode
(MiniRunner from test_model_forward), so that a test can compare the two.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from octavo.models.loader import load_weights
from octavo.models.registry import get_model_class

_WORKER = r'''
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from tp_util import one_rank_logits
from octavo.models.layers.parallel_state import set_tensor_parallel
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
set_tensor_parallel(rank, 2)
workdir = sys.argv[2]
seqs = torch.load(os.path.join(workdir, "seqs.pt"))
for i, model_dir in enumerate(sys.argv[3:]):
    logits = one_rank_logits(model_dir, seqs)
    if rank == 0:
        torch.save(logits, os.path.join(workdir, f"out{i}.pt"))
dist.barrier()  # no rank tears down gloo while the other still has traffic in flight
dist.destroy_process_group()
# Leave without C++ static destructors: once in a CI run a rank died in teardown with "terminate
# called without an active exception" after its work was done and saved (not reproduced alone).
sys.stdout.flush()
os._exit(0)
'''


def one_rank_logits(model_dir: str, seqs: list[list[int]]) -> torch.Tensor:
    from test_model_forward import MiniRunner
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)  # remote-code layouts
    model = get_model_class(config)(config)
    load_weights(model, model_dir)
    runner = MiniRunner(model)
    return torch.cat([runner.step([(j, s[:-1]) for j, s in enumerate(seqs)]),
                      runner.step([(j, s[-1:]) for j, s in enumerate(seqs)])])


def run_two_ranks(script: str, args: list[str], timeout: float = 300) -> None:
    """Runs `python script *args` as ranks 0 and 1 of a torch.distributed world of two (env://
    on a free local port, one thread each) and asserts that both exit cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]


def two_rank_logits(model_dirs: list[str], seqs: list[list[int]], workdir: str) -> list[torch.Tensor]:
    torch.save(seqs, os.path.join(workdir, "seqs.pt"))
    worker = os.path.join(workdir, "tp_worker.py")
    with open(worker, "w") as f:
        f.write(_WORKER)
    run_two_ranks(worker, [os.path.dirname(__file__), workdir, *model_dirs])
    return [torch.load(os.path.join(workdir, f"out{i}.pt")) for i in range(len(model_dirs))]
