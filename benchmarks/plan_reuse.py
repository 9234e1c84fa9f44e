"""Plan reuse: how many launch plans a model builds per training step, and what one build costs.

A model of `--layers` attention layers (document masking over packed sequences: a metadata plan) runs
its forward and backward once; the number of metadata plans built (`attnc.runtime.plan.metadata_builds`)
is counted in three ways:

- `reuse`: calls without a plan; each launch finds the plan of the last launch with the same lengths
  and inputs (`attnc.runtime.launch.PlanCache`);
- `given`: one `kern.plan(...)` made before the step, passed to every layer (`kern(q, k, v, plan=plan)`);
- `no_cache`: `PLAN_CACHE_SIZE = 0`, every launch builds its own plan (what attnc did before issue 17).

The kernels run under Triton's interpreter where there is no GPU, so the step uses small shapes (the
counts do not depend on them). Besides the counts, the time of one plan build at `--build-length`
tokens (document mask, CPU or the GPU) says what each saved build is worth.

    .venv/bin/python benchmarks/plan_reuse.py --out benchmarks/results/plan_reuse-<device>-<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import attnc
from attnc.analysis.summaries import forget_tables
from attnc.runtime import launch
from attnc.runtime.plan import metadata_builds

DOC = attnc.load(
    Path(__file__).resolve().parent.parent / "examples" / "document_causal.attn"
).document_causal()


def documents(batch: int, length: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """Document ids of `count` documents of random lengths per batch row, int32 [batch, length]."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(1, length, (batch, count - 1), generator=g), dim=1).values
    ids = (torch.arange(length).reshape(1, 1, -1) >= cuts.unsqueeze(-1)).sum(1).to(torch.int32)
    return ids.to(device)


def step(layers: int, length: int, mode: str, device: torch.device) -> dict[str, Any]:
    """One forward and backward of `layers` layers; the plans it built and its time."""
    torch.manual_seed(0)
    doc = documents(1, length, 3, seed=1, device=device)
    x = torch.randn(1, 2, length, 16, device=device, requires_grad=True)
    kvs = [torch.randn(2, 1, 2, length, 16, device=device, requires_grad=True) for _ in range(layers)]
    size = launch.PLAN_CACHE_SIZE
    launch.PLAN_CACHE_SIZE = 0 if mode == "no_cache" else size
    DOC._forward.plans.clear()
    try:
        before, start = metadata_builds(), time.perf_counter()
        plan = DOC.plan(length, length, block=(32, 32), doc=doc) if mode == "given" else None
        h = x
        for kv in kvs:
            h = (
                DOC(h, kv[0], kv[1], plan=plan, doc=doc)
                if plan is not None
                else DOC(h, kv[0], kv[1], doc=doc)
            )
        h.sum().backward()
        seconds = time.perf_counter() - start
        builds = metadata_builds() - before
    finally:
        launch.PLAN_CACHE_SIZE = size
    return {"mode": mode, "layers": layers, "length": length, "plan_builds": builds, "step_seconds": seconds}


def build_time(length: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Seconds one document-mask plan build takes at `length` tokens (block 128 x 128), best of
    `repeats`."""
    doc = documents(1, length, 16, seed=2, device=device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        forget_tables()  # a new input's build (plans over an unchanged input reuse its range tables)
        start = time.perf_counter()
        DOC.plan(length, length, block=(128, 128), doc=doc)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"length": length, "block": [128, 128], "seconds_best": min(times), "repeats": repeats}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="tokens per step (the interpreter is slow)")
    parser.add_argument("--build-length", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch's CPU threads (default 1: on a busy machine a thread pool larger than the idle cores "
        "slows each operation by 10-100x)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = [step(args.layers, args.length, mode, device) for mode in ("reuse", "given", "no_cache")]
    for s in steps:
        print(
            f"{s['mode']:>9}: {s['plan_builds']} plan builds over {s['layers']} layers' forward and backward"
        )
    build = build_time(args.build_length, device, args.repeats)
    print(f"one document-mask plan build at {build['length']} tokens: {build['seconds_best'] * 1e3:.1f} ms")
    result = {
        "benchmark": "plan_reuse",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "attnc": attnc.__version__,
        "steps": steps,
        "build": build,
        "note": "CPU times are disturbed by other work on the machine; the counts are exact",
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
