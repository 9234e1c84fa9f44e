"""What a first call's autotuning costs in compiles: causal attention, head dim 128, bf16, 16K tokens.

Two measurements, one per machine:

- `--aot` (no GPU needed): the kernels of one shape bucket's autotune candidates, compiled ahead of time
  for sm_90 (`attnc/testing/static.py`: attnc's launcher records the launches, `triton.compile` builds
  them with the ptxas of Triton's wheel), forward and backward, for the candidates before this change
  (every configuration that fits the shared memory and the register estimate) and after it (at most
  `autotune.MAX_CANDIDATES`, `autotune.candidates`), each compiled one after another and in a pool of
  `autotune.compile_workers` threads as the autotuner does (`autotune.compile_all`). Triton's cache is
  bypassed (every compile is a real one). Wall and CPU seconds; each kernel's CPU seconds in ptxas (a
  child process, which does not hold Python's lock) are kept apart from those of Triton's front end
  and LLVM (in the compiling thread, which holds it for at least its Python parts). Projections for a
  host with 16 idle CPUs as fast as these, from the serial CPU seconds, are a range: front end
  serialised (`front + ptxas / min(16, kernels)`) to all in parallel (`(front + ptxas) / min(16,
  kernels)`).
- `--first-call` (on a GPU): the seconds of the first forward call and the first backward call of a
  kernel in a fresh process with empty attnc and Triton caches (compile + autotune + one run), then
  of a second call; `--candidates all --serial` gives the behaviour before this change.

    .venv/bin/python benchmarks/autotune_compile.py --aot            # ~4 min on 2 idle cores
    python3 benchmarks/autotune_compile.py --first-call              # GPU (benchmarks/gpu_run.sh autotune)

Results: JSON under `benchmarks/results/` (`--output`).
"""

from __future__ import annotations

import os
import sys

if "--aot" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "0"  # Triton's compiler, not its interpreter
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # no cache hits: every compile is timed

import argparse
import datetime
import json
import platform
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PATTERN, HEAD_DIM, DTYPE, LENGTH = "causal", 128, "bfloat16", 16384
H100_SHARED = 232448
PROJECTED_CPUS = 16


# ---- ahead of time, for sm_90, on this host -------------------------------------------------------------


class _Ptxas:
    """Seconds spent in child processes (ptxas) by the thread that started them."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._run = subprocess.run

    def __enter__(self) -> _Ptxas:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return self._run(*args, **kwargs)
            finally:
                ident = threading.get_ident()
                self.seconds[ident] = self.seconds.get(ident, 0.0) + time.perf_counter() - start

        subprocess.run = timed
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run = self._run

    def take(self) -> float:
        return self.seconds.pop(threading.get_ident(), 0.0)


def candidate_lists(backward: bool) -> dict[str, list[tuple[str, Any]]]:
    """(kernel, configuration) of every compile the bucket's autotuning makes, before the cap on
    candidates (`all`) and with it (`pruned`): the forward's candidates, or the backward's dQ and dK/dV
    candidates, each kernel tuned apart (`autotune.candidates(..., dkv=)`)."""
    from unittest import mock

    from attnc.runtime import autotune

    shape = autotune.LaunchShape(DTYPE, HEAD_DIM, HEAD_DIM, 1, LENGTH, LENGTH, 2 * 4)
    kernels = (("attnc_bwd_dq", False), ("attnc_bwd_dkv", True)) if backward else (("attnc_fwd", False),)

    def listed() -> list[tuple[str, Any]]:
        return [
            (kernel, config)
            for kernel, dkv in kernels
            for config in autotune.candidates(shape, H100_SHARED, backward, dkv=dkv)
        ]

    with (
        mock.patch.object(autotune, "MAX_CANDIDATES", 10**6),
        mock.patch.object(autotune, "MAX_BACKWARD_CANDIDATES", 10**6),
    ):
        every = listed()
    return {"all": every, "pruned": listed()}


def launches(compiles: list[tuple[str, Any]], backward: bool) -> list[tuple[Any, Any]]:
    """(config, recorded launch) of each (kernel, configuration): the kernel's launch in a call run at
    that configuration."""
    from attnc.testing import static

    items = []
    for kernel, config in compiles:
        job = static.Job(PATTERN, HEAD_DIM, 90, backward, DTYPE, LENGTH, config)
        items += [(config, item) for item in static.record(job) if item.kernel == kernel]
    return items


def compile_all(items: list[tuple[Any, Any]], workers: int, ptxas: _Ptxas) -> dict[str, Any]:
    """Compile every launch (serially with one worker, else in a pool as the autotuner does)."""
    from attnc.testing import static

    def one(entry: tuple[Any, Any]) -> dict[str, Any]:
        config, item = entry
        start, cpu, children = time.perf_counter(), time.thread_time(), _children_cpu()
        static.compile_launch(item, 90)
        return {
            "config": str(config),
            "kernel": item.kernel,
            "seconds": round(time.perf_counter() - start, 3),
            "ptxas_s": round(ptxas.take(), 3),
            # CPU seconds (what load from other processes does not inflate): this thread's, and
            # ptxas's (children; meaningful one compile at a time, in the serial run).
            "front_cpu_s": round(time.thread_time() - cpu, 3),
            "ptxas_cpu_s": round(_children_cpu() - children, 3),
        }

    start, before = time.perf_counter(), os.times()
    if workers == 1:
        kernels = [one(entry) for entry in items]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="attnc-compile") as pool:
            kernels = list(pool.map(one, items))
    after = os.times()
    fields = ("user", "system", "children_user", "children_system")
    cpu = sum(getattr(after, f) - getattr(before, f) for f in fields)
    return {
        "workers": workers,
        "wall_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(cpu, 2),
        "kernels": kernels,
    }


def _children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def aot(lists: list[str], directions: list[str]) -> dict[str, Any]:
    from attnc.runtime import autotune
    from attnc.testing import static

    static.compile_launch(launches(candidate_lists(False)["pruned"][:1], False)[0][1], 90)  # imports, warm
    results: dict[str, Any] = {}
    with _Ptxas() as ptxas:
        for direction in directions:
            backward = direction == "backward"
            for name, configs in candidate_lists(backward).items():
                if name not in lists:
                    continue
                items = launches(configs, backward)
                workers = autotune.compile_workers(len(items))
                case = {"candidates": [f"{k} {c}" for k, c in configs], "kernels": len(items)}
                case["serial"] = compile_all(items, 1, ptxas)
                case["parallel"] = compile_all(items, workers, ptxas)
                serial = case["serial"]["kernels"]
                front = sum(k["front_cpu_s"] for k in serial)
                in_ptxas = sum(k["ptxas_cpu_s"] for k in serial)
                case["front_end_cpu_s"], case["ptxas_cpu_s"] = round(front, 2), round(in_ptxas, 2)
                # Projections for a host with PROJECTED_CPUS idle CPUs as fast as these, from the serial
                # run's CPU seconds: if Triton's front end held Python's lock throughout (only ptxas in
                # parallel), and if every compile ran in parallel.
                spread = min(PROJECTED_CPUS, len(items))
                case["projected"] = {
                    "cpus": PROJECTED_CPUS,
                    "front_end_serialised_s": round(front + in_ptxas / spread, 1),
                    "all_parallel_s": round((front + in_ptxas) / spread, 1),
                }
                case["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
                results[f"{direction} {name}"] = case
                print(
                    f"{direction} {name}: {len(configs)} candidates, {len(items)} kernels: serial "
                    f"{case['serial']['wall_s']} s ({case['serial']['cpu_s']} s CPU), {workers} threads "
                    f"{case['parallel']['wall_s']} s ({case['parallel']['cpu_s']} s CPU); CPU front end "
                    f"{front:.1f} s + ptxas {in_ptxas:.1f} s; projected for {PROJECTED_CPUS} CPUs "
                    f"{case['projected']['front_end_serialised_s']} to "
                    f"{case['projected']['all_parallel_s']} s; "
                    f"load {case['load_average']}",
                    flush=True,
                )
    return results


# ---- the first call on a GPU -------------------------------------------------------------------------------


def first_call(candidates: str, serial: bool, batch: int, heads: int) -> dict[str, Any]:
    """Seconds of the first and second forward and backward calls, with empty caches."""
    fresh = tempfile.mkdtemp(prefix="attnc-first-call-")
    os.environ["ATTNC_CACHE_DIR"] = os.path.join(fresh, "attnc")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(fresh, "triton")
    os.environ.pop("ATTNC_CONFIG", None)
    os.environ["ATTNC_AUTOTUNE"] = "1"
    import torch

    import attnc
    from attnc.runtime import autotune, launch

    if candidates == "all":
        autotune.MAX_CANDIDATES = autotune.MAX_BACKWARD_CANDIDATES = 10**6
    if serial:
        autotune.compile_all = lambda configs, compile: None  # each compiles when first timed

    kern = attnc.stdlib().causal()
    dtype = getattr(torch, DTYPE)
    q, k, v = (
        torch.randn(batch, heads, LENGTH, HEAD_DIM, device="cuda", dtype=dtype, requires_grad=True)
        for _ in range(3)
    )
    dout = torch.randn_like(q)
    seconds: dict[str, float] = {}
    for call in ("first", "second"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = kern(q, k, v)
        torch.cuda.synchronize()
        seconds[f"{call}_forward_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        out.backward(dout)
        torch.cuda.synchronize()
        seconds[f"{call}_backward_s"] = round(time.perf_counter() - start, 3)
    shape = autotune.LaunchShape(DTYPE, HEAD_DIM, HEAD_DIM, 1, LENGTH, LENGTH, batch * heads)
    shared = launch._device_limits(torch.cuda.current_device())[1]
    return {
        "candidates": candidates,
        "compile": "serial" if serial else "parallel",
        "shape": f"causal d{HEAD_DIM} {DTYPE} B{batch} H{heads} L{LENGTH}",
        "forward_candidates": len(autotune.candidates(shape, shared)),
        "backward_candidates": len(autotune.candidates(shape, shared, True)),
        "backward_dkv_candidates": len(autotune.candidates(shape, shared, True, True)),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(),
        **seconds,
    }


def tools() -> dict[str, str]:
    import torch
    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "attnc_commit": commit.stdout.strip(),
        "host": platform.processor() or platform.machine(),
        "cpus": str(os.cpu_count()),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--aot", action="store_true", help="compile ahead of time for sm_90 (no GPU)")
    mode.add_argument("--first-call", action="store_true", help="time a first call on this GPU")
    parser.add_argument("--lists", nargs="*", default=["all", "pruned"], choices=["all", "pruned"])
    parser.add_argument("--directions", nargs="*", default=["forward", "backward"])
    parser.add_argument("--candidates", default="pruned", choices=["all", "pruned"], help="--first-call")
    parser.add_argument("--serial", action="store_true", help="--first-call: no parallel compiles")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--output", type=Path, help="the JSON results (default: under benchmarks/results/)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    start = time.perf_counter()
    date = datetime.date.today().isoformat()
    if args.aot:
        result: dict[str, Any] = {"mode": "aot sm_90", "cases": aot(args.lists, args.directions)}
        output = args.output or RESULTS / f"autotune_compile-aot-{date}.json"
    else:
        result = {"mode": "first call", **first_call(args.candidates, args.serial, args.batch, args.heads)}
        output = args.output or RESULTS / f"autotune_compile-first-call-{date}.json"
        print(json.dumps(result))
    result = {"date": date, "tools": tools(), "seconds": round(time.perf_counter() - start), **result}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
