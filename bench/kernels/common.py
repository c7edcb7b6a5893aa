"""Timing and bandwidth helpers shared by the kernel labs (STYLE habit 10).

A lab runs on `--device` (a CUDA GPU when there is one, else the CPU): `parse(p)` makes it the
default device, so the lab's tensors land there; times on a GPU come from CUDA events."""
import argparse
import statistics
import time

import torch

import octavo.ops  # noqa: F401  (loads octavo._C and registers torch.ops.octavo)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (median reported)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"], help="where the kernels run (default: a GPU if any)")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the lab's arguments and make --device the default device for its tensors."""
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    torch.set_default_device(args.device)
    return args


def generator(seed: int = 0) -> torch.Generator:
    """A seeded generator on the lab's device (randn/randperm need one there)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def time_fn(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if torch.get_default_device().type == "cuda":
        return _time_cuda(fn, repeats)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_cuda(fn, repeats: int) -> float:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """This machine's copy bandwidth in GB/s (bytes read + bytes written), measured now."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / t / 1e9


def report(name: str, seconds: float, nbytes: float, flops: float, copy_gbs: float) -> None:
    gbs = nbytes / seconds / 1e9
    print(f"{name:<44} {seconds * 1e3:9.3f} ms  {gbs:7.1f} GB/s ({gbs / copy_gbs:5.0%} of copy)"
          f"  {flops / seconds / 1e9:8.1f} GFLOP/s")


def check(name: str, out: torch.Tensor, native: torch.Tensor, exact: torch.Tensor) -> None:
    err = (out.double() - exact.double()).abs().max().item()
    native_err = (native.double() - exact.double()).abs().max().item()
    ok = err <= 2 * native_err + 1e-5 * exact.double().abs().max().item() + 1e-6
    print(f"check {name}: max err {err:.3g} (native {native_err:.3g}) {'OK' if ok else 'FAIL'}")
    if not ok:
        raise SystemExit(f"{name}: kernel disagrees with the reference")
