"""octavo's OpenMP spin count only reaches libgomp when octavo is imported before torch: with
torch first and OMP_WAIT_POLICY=PASSIVE already set (workers that sleep after every op), import
octavo says so and how to fix it; otherwise it stays quiet."""
import os
import subprocess
import sys

import pytest


def _import(code: str, **env_over: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_over)
    res = subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", code], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stderr


@pytest.mark.parametrize("policy", ["PASSIVE", "passive"])
def test_torch_first_with_passive_policy_warns(policy):
    err = _import("import torch, octavo", OMP_WAIT_POLICY=policy)
    assert "GOMP_SPINCOUNT=20000" in err and "import octavo before torch" in err


@pytest.mark.parametrize("code,env", [
    ("import octavo, torch", {"OMP_WAIT_POLICY": "PASSIVE"}),            # octavo first: it sets the spin
    ("import torch, octavo", {}),                                         # libgomp's default policy
    ("import torch, octavo", {"OMP_WAIT_POLICY": "ACTIVE"}),
    ("import torch, octavo", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}),  # chosen
])
def test_quiet_otherwise(code, env):
    assert "GOMP_SPINCOUNT" not in _import(code, **env)
