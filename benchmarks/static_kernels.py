"""What attnc's kernels compile to on an H100 (sm_90), measured without a GPU: each benchmark pattern's
forward and backward kernels, and a soft-capped causal's (`static.PATTERNS`), at head dims 64, 128
and 256 (bf16, the configuration a launch tries first), beside two causal reference kernels compiled
the same way (`reference_kernels.py`: the structure of Triton's Hopper tutorial, with TMA, and of
FlexAttention's forward template).

For each kernel: registers and spilled bytes (`ptxas -v`, the ptxas of Triton's wheel), the shared
memory Triton allocates, how many of its tile loops are pipelined (TTGIR: later tiles fetched while
one is computed, two or more in flight), and the SASS instructions of one iteration of its tile loops
split into FP32, integer and MUFU (exp2 and the like): the FULL-tile loop (no mask: the loop with the
fewest instructions) and the costliest PARTIAL one (`attnc/testing/static.py` does the reading).

    .venv/bin/python benchmarks/static_kernels.py                    # all (~10 min on 2 cores)
    .venv/bin/python benchmarks/static_kernels.py --dims 128 --patterns causal
    .venv/bin/python benchmarks/static_kernels.py --markdown results/static_kernels-sm90-....json

Results: `benchmarks/results/static_kernels-sm90-<date>.json` with the tool versions; a Markdown table
is printed.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0")  # Triton's compiler, not its interpreter

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_kernels

from attnc.runtime.autotune import Config
from attnc.testing import static

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DIMS = (64, 128, 256)
REFERENCE_NAMES = {
    "tutorial_fwd": "reference: Triton tutorial (TMA)",
    "flex_fwd": "reference: FlexAttention-style",
}
BATCH, HEADS, LENGTH = 2, 4, 4096


def reference_launches(head_dim: int, config: Config) -> list[static.Launch]:
    """The two reference kernels' launches for causal attention, bf16, at attnc's configuration."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn = config.block_m, config.block_n
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    q, k, v, o = (torch.zeros(BATCH, HEADS, LENGTH, head_dim, dtype=torch.bfloat16) for _ in range(4))
    flat = [t.view(-1, head_dim) for t in (q, k, v, o)]
    descriptors = [
        TensorDescriptor(t, list(t.shape), list(t.stride()), [block, head_dim])
        for t, block in zip(flat, (bm, bn, bn, bm), strict=True)
    ]
    tutorial = static.Launch(
        "tutorial_fwd", reference_kernels.tutorial_fwd, (*descriptors, head_dim**-0.5, LENGTH),
        {"HEAD_DIM": head_dim, "BLOCK_M": bm, "BLOCK_N": bn, **options},
    )  # fmt: skip
    tiles = LENGTH // bm
    counts = torch.zeros(tiles, dtype=torch.int32)
    indices = torch.zeros(tiles, LENGTH // bn, dtype=torch.int32)
    flex = static.Launch(
        "flex_fwd", reference_kernels.flex_fwd,
        (q, k, v, o, counts, indices, counts, indices, head_dim**-0.5,
         *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
         HEADS, LENGTH, LENGTH, LENGTH // bn),
        {"HEAD_DIM": head_dim, "BLOCK_M": bm, "BLOCK_N": bn, **options},
    )  # fmt: skip
    return [tutorial, flex]


def measure(patterns: list[str], dims: tuple[int, ...], references: bool) -> list[dict[str, Any]]:
    rows = []
    for head_dim in dims:
        for pattern in patterns:
            for backward in (False, True):
                job = static.Job(pattern, head_dim, backward=backward, length=LENGTH)
                for report in static.compile_job(job):
                    rows.append(report.as_json())
                    print(_line(rows[-1]), flush=True)
        if references:
            job = static.Job("causal", head_dim, length=LENGTH)
            config = static.first_config(job)
            for item in reference_launches(head_dim, config):
                start = time.perf_counter()
                compiled = static.compile_launch(item, 90)
                reference_job = static.Job(REFERENCE_NAMES[item.kernel], head_dim, length=LENGTH)
                report = static.analyse(reference_job, item, config, compiled, time.perf_counter() - start)
                rows.append(report.as_json())
                print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['pattern']} {row['kernel']} d{row['head_dim']}: {row['registers']} registers, "
        f"{row['spill_stores']} bytes spilled, {row['shared']} bytes shared, {row['compile_s']:.1f} s"
    )


def _loop_cells(loop: dict[str, Any] | None) -> list[str]:
    if loop is None:
        return ["-"] * 4
    kinds = loop["by_kind"]
    return [str(loop["instructions"]), *(str(kinds.get(k, 0)) for k in ("fp32", "int", "mufu"))]


def markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| kernel | d | config (BM, BN, warps, stages) | registers | spilled bytes | shared KiB "
        "| pipelined loops | FULL tile: SASS / FP32 / int / MUFU "
        "| costliest PARTIAL tile: SASS / FP32 / int / MUFU |\n"
        "|---|---:|---|---:|---:|---:|---:|---|---|\n"
    )
    lines = []
    for row in rows:
        config = row["config"]
        values = [int(part.split("=")[1]) for part in config.split()]
        loops = row["sass_loops"]
        # A single loop (a pattern whose plan has no FULL tiles) is a PARTIAL one.
        full = min(loops, key=lambda loop: loop["instructions"]) if len(loops) > 1 else None
        partial = max(loops, key=lambda loop: loop["instructions"]) if loops else None
        pipelined = sum(loop["pipelined"] for loop in row["loops"])
        name = row["pattern"]
        lines.append(
            f"| {name} `{row['kernel']}` | {row['head_dim']} | {', '.join(map(str, values))} "
            f"| {row['registers']} | {row['spill_stores']} | {row['shared'] / 1024:.0f} "
            f"| {pipelined}/{len(row['loops'])} "
            f"| {' / '.join(_loop_cells(full))} | {' / '.join(_loop_cells(partial))} |"
        )
    return header + "\n".join(lines) + "\n"


def tools() -> dict[str, str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "attnc"], capture_output=True, text=True, cwd=ROOT
    )
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": static.ptxas_version(90),
        "target": "cuda sm_90a (H100), bf16",
        "attnc_commit": commit.stdout.strip()
        + (" (with uncommitted changes)" if dirty.stdout.strip() else ""),
        "host": platform.processor() or platform.machine(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The benchmark's patterns and the static checks' soft-capped causal (`static.PATTERNS`).
    parser.add_argument("--patterns", nargs="*", default=list(static.PATTERNS), choices=list(static.PATTERNS))
    parser.add_argument("--dims", nargs="*", type=int, default=list(DIMS))
    parser.add_argument("--no-references", action="store_true", help="attnc's kernels only")
    parser.add_argument("--output", type=Path, help="the JSON results (default: under benchmarks/results/)")
    parser.add_argument("--markdown", type=Path, help="print the table of a saved result and stop")
    parser.add_argument("--note", default="", help="recorded in the results (what was measured)")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text(encoding="utf-8"))["kernels"]))
        return 0
    start = time.perf_counter()
    rows = measure(args.patterns, tuple(args.dims), not args.no_references)
    date = datetime.date.today().isoformat()
    output = args.output or RESULTS / f"static_kernels-sm90-{date}.json"
    result = {
        "date": date,
        "note": args.note,
        "tools": tools(),
        "seconds": round(time.perf_counter() - start),
        "kernels": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(markdown(rows))
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
