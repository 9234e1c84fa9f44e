"""Plan work: the share of the attention matrix a launch visits, attnc's plan vs FlexAttention's BlockMask.

For every benchmark pattern (`attnc/bench.py`, at its GPU scale: windows of 1024, documents of median
512, the 10% block map of 128-position blocks, ...) plus MoBA and MInference's vertical-slash heads
(`examples/dynamic_sparse.attn`), at 8K and 32K tokens, batch 1, one head:

- **ideal**: the allowed (query, key) pairs, counted exactly from the benchmark's `mask_mod`;
- **attnc**: the pairs inside the tiles (128 x 128) that `kern.plan(L, L, block=(128, 128))` visits
  (PARTIAL or FULL), and its FULL tiles;
- **Flex**: the same for FlexAttention's `BlockMask` at its defaults (128 x 128 blocks): a block is
  visited when any of its pairs is allowed and FULL when all are. This is what `create_block_mask`
  computes from the `mask_mod`; here it is computed with torch from the same dense mask, a block of
  query rows at a time, without FlexAttention itself (exact, and the same numbers on any torch). It is
  also the **exact tile map** (what `kern.block_map` gives): the tiles any tile-granular kernel must
  visit, so attnc's work over it is what the plan adds, and the exact map's work over ideal is what
  the tiles themselves cost.
- **At the launched tiles**: the same at the other tile sizes of `--tiles` (default 128 x 64, the
  forward's first choice in `runtime/autotune.py` for head dims up to 128, and 32 x 64, the
  backward's): attnc's plan and the exact tile map at that size. A kernel called without a plan builds
  its plan for the block it launches, so these are the work it does.

Work is reported as visited pairs / ideal pairs (1.0: nothing visited in vain; tiles on a mask's edge
make it exceed 1 for any tiled kernel). The run also checks that attnc's plan is sound against the dense
mask (no EMPTY tile with an allowed pair, no FULL tile with a masked pair): a violation stops it.

Plan build time: `kern.plan` at 128K tokens for causal documents and the 10% block map (median of
`--reps` calls after a warm-up; on a shared CPU these move by tens of percent).

Usage::

    .venv/bin/python benchmarks/plan_work.py                  # ~10 min on 2 cores
    .venv/bin/python benchmarks/plan_work.py --lengths 8192 --patterns block_sparse moba   # a subset
    .venv/bin/python benchmarks/plan_work.py --lengths --threads 1 --label build-after     # build times only

Results go to `benchmarks/results/plan_work-<label>-<device>-<date>.json`; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that `python benchmarks/plan_work.py` finds attnc without installing it
    sys.path.insert(0, str(ROOT))

import attnc  # noqa: E402
from attnc import bench  # noqa: E402
from attnc.analysis.summaries import forget_tables  # noqa: E402

TILE = 128
LENGTHS = (8192, 32768)
BUILD_LENGTH = 131072
SEED = 0
EMPTY, PARTIAL, FULL = 0, 1, 2
MOBA_BLOCK = 512  # MoBA's blocks are 512 to 4096 tokens; 10% of the past blocks selected per query block
MOBA_SMALL_BLOCK = 64  # and a finer selection (table granularity 64, below a 128-row tile)
TILES = ((128, 64), (32, 64))  # besides TILE x TILE: the forward's and the backward's first choices
VS_COLUMNS = 64  # vertical-slash: 4 sinks + 60 random key columns, and 64 diagonals: 0..31 + 32 random
VS_DIAGONALS = 64


def _sparse() -> attnc.Module:
    return attnc.load(ROOT / "examples" / "dynamic_sparse.attn")


def _moba(
    shape: bench.Shape, scale: bench.Scale, device: torch.device, seed: int, block: int = MOBA_BLOCK
) -> bench.Workload:
    blocks = -(-shape.length // block)
    selected = bench.block_map(shape.batch, shape.heads, blocks, blocks, scale.block_density, seed).to(device)

    def moba(b, h, q, kv):  # type: ignore[no-untyped-def]
        own = q // block == kv // block
        return (kv <= q) & (own | selected[b, h, q // block, kv // block])

    kernel = _sparse().moba(block=block)
    label = f"MoBA {block} ({scale.block_density:.0%})"
    params = {"block": block, "density": scale.block_density}
    name = "moba" if block == MOBA_BLOCK else f"moba_{block}"
    return bench.Workload(name, label, params, kernel, {"selected": selected}, moba, True, True, None)


def _moba_small(shape: bench.Shape, scale: bench.Scale, device: torch.device, seed: int) -> bench.Workload:
    return _moba(shape, scale, device, seed, MOBA_SMALL_BLOCK)


def _vertical_slash(
    shape: bench.Shape, scale: bench.Scale, device: torch.device, seed: int
) -> bench.Workload:
    g = torch.Generator().manual_seed(seed)
    length = shape.length
    is_column = torch.zeros(shape.batch, shape.heads, length, dtype=torch.bool)
    is_diagonal = torch.zeros(shape.batch, shape.heads, length, dtype=torch.bool)
    is_column[..., :4] = True
    is_diagonal[..., : VS_DIAGONALS // 2] = True
    for row in range(shape.batch * shape.heads):
        b, h = divmod(row, shape.heads)
        is_column[b, h, 4 + torch.randperm(length - 4, generator=g)[: VS_COLUMNS - 4]] = True
        far = VS_DIAGONALS // 2 + torch.randperm(length - VS_DIAGONALS // 2, generator=g)[: VS_DIAGONALS // 2]
        is_diagonal[b, h, far] = True
    is_column, is_diagonal = is_column.to(device), is_diagonal.to(device)

    def vertical_slash(b, h, q, kv):  # type: ignore[no-untyped-def]
        offset = (q - kv).clamp(min=0)
        return (kv <= q) & (is_column[b, h, kv] | is_diagonal[b, h, offset])

    inputs = {"is_column": is_column, "is_diagonal": is_diagonal}
    label = f"vertical-slash ({VS_COLUMNS} columns, {VS_DIAGONALS} diagonals)"
    params = {"columns": VS_COLUMNS, "diagonals": VS_DIAGONALS}
    kernel = _sparse().vertical_slash()
    return bench.Workload("vertical_slash", label, params, kernel, inputs, vertical_slash, True, True, None)


PATTERNS: dict[str, Callable[..., bench.Workload]] = {
    **bench.PATTERNS,
    "moba": _moba,
    f"moba_{MOBA_SMALL_BLOCK}": _moba_small,
    "vertical_slash": _vertical_slash,
}


Tile = tuple[int, int]


def _sizes(length: int, block: int, device: torch.device) -> torch.Tensor:
    first = torch.arange(0, length, block, device=device)
    return (torch.clamp(first + block, max=length) - first).to(torch.int64)


def tile_areas(length: int, device: torch.device, tile: Tile = (TILE, TILE)) -> torch.Tensor:
    """Pairs inside the lengths of each (query tile, key tile), int64 [query tiles, key tiles]."""
    return _sizes(length, tile[0], device).reshape(-1, 1) * _sizes(length, tile[1], device).reshape(1, -1)


def exact_tiles(
    workload: bench.Workload, shape: bench.Shape, device: torch.device, tiles: list[Tile]
) -> tuple[dict[Tile, torch.Tensor], int]:
    """(exact tile classes int8 [B', H', query tiles, key tiles] for each tile size, allowed pairs) from
    the dense `mask_mod`, query rows a block at a time: at 128 x 128 what FlexAttention's
    create_block_mask computes."""
    batch = shape.batch if workload.batch_dependent else 1
    heads = shape.heads if workload.head_dependent else 1
    step = max(t[0] for t in tiles)  # every query tile size divides it (powers of two)
    rows = max(step, (bench.ROW_ELEMENTS // max(1, batch * heads * shape.length)) // step * step)
    classes = {
        t: torch.empty(batch, heads, -(-shape.length // t[0]), -(-shape.length // t[1]), dtype=torch.int8)
        for t in tiles
    }
    pairs = 0
    for start in range(0, shape.length, rows):
        stop = min(shape.length, start + rows)
        allowed = bench.mask_rows(workload, shape, start, stop, device)
        pairs += int(allowed.sum())
        for (tm, tn), out in classes.items():
            pad_q, pad_kv = -(stop - start) % tm, -shape.length % tn
            padded = torch.nn.functional.pad(allowed, (0, pad_kv, 0, pad_q))
            m, n = padded.shape[2] // tm, padded.shape[3] // tn
            counts = padded.reshape(batch, heads, m, tm, n, tn).sum(dim=(3, 5))
            area = tile_areas(shape.length, device, (tm, tn))[start // tm : start // tm + m]
            here = torch.where(counts == area, FULL, torch.where(counts > 0, PARTIAL, EMPTY))
            out[:, :, start // tm : start // tm + m] = here.to(torch.int8).cpu()
    return {t: c.to(device) for t, c in classes.items()}, pairs * (shape.batch // batch) * (
        shape.heads // heads
    )


def work(classes: torch.Tensor, shape: bench.Shape, tile: Tile = (TILE, TILE)) -> dict[str, int]:
    """Visited pairs and tiles (PARTIAL or FULL) and FULL tiles, over every batch row and head."""
    classes = classes.expand(shape.batch, shape.heads, -1, -1)
    areas = tile_areas(shape.length, classes.device, tile)
    visited = classes != EMPTY
    return {
        "visited_pairs": int((visited * areas).sum()),
        "visited_tiles": int(visited.sum()),
        "full_tiles": int((classes == FULL).sum()),
    }


def measure(name: str, length: int, device: torch.device, tiles: list[Tile]) -> dict[str, Any]:
    shape = bench.Shape(length, 1, 1)
    workload = PATTERNS[name](shape, bench.GPU_SCALE, device, SEED)
    kw = {"batch": shape.batch, "num_heads": shape.heads, **workload.inputs}
    exact_by_tile, ideal = exact_tiles(workload, shape, device, [(TILE, TILE), *tiles])
    by_tile, plan_s = [], 0.0
    for tile in [(TILE, TILE), *tiles]:
        started = time.perf_counter()
        plan = workload.kernel.plan(length, length, block=tile, device=device, **kw)
        if tile == (TILE, TILE):
            plan_s = time.perf_counter() - started
        planned, exact = plan.block_map(), exact_by_tile[tile]
        shape_bh = torch.broadcast_shapes(planned.shape, exact.shape)
        p, e = planned.expand(shape_bh), exact.expand(shape_bh)
        unsound = int(((p != e) & (p != PARTIAL)).sum())
        if unsound:
            raise SystemExit(
                f"{name} at {length}, {tile}: the plan claims a class {unsound} tiles do not have"
            )
        mine, exact_work = work(planned, shape, tile), work(exact, shape, tile)
        by_tile.append(
            {
                "tile": list(tile),
                "attnc": mine,
                "exact": exact_work,
                "attnc_work_over_ideal": mine["visited_pairs"] / ideal if ideal else None,
                "exact_work_over_ideal": exact_work["visited_pairs"] / ideal if ideal else None,
                "attnc_work_over_exact": mine["visited_pairs"] / exact_work["visited_pairs"]
                if exact_work["visited_pairs"]
                else None,
            }
        )
    attnc_work, flex_work = by_tile[0]["attnc"], by_tile[0]["exact"]
    return {
        "pattern": name,
        "label": workload.label,
        "params": workload.params,
        "length": length,
        "sparsity": plan.sparsity,
        "ideal_pairs": ideal,
        "attnc": attnc_work,
        "flex": flex_work,
        "attnc_work_over_ideal": attnc_work["visited_pairs"] / ideal if ideal else None,
        "flex_work_over_ideal": flex_work["visited_pairs"] / ideal if ideal else None,
        "attnc_work_over_exact_tiles": by_tile[0]["attnc_work_over_exact"],
        "by_tile": by_tile,
        "plan_s": plan_s,
    }


def build_time(name: str, reps: int, device: torch.device) -> dict[str, Any]:
    """`kern.plan` at BUILD_LENGTH: median wall time and, on the CPU, median process CPU time (less
    disturbed by other processes than the wall time, with `--threads 1`)."""
    shape = bench.Shape(BUILD_LENGTH, 1, 1)
    workload = PATTERNS[name](shape, bench.GPU_SCALE, device, SEED)
    kw = {"batch": 1, "num_heads": 1, "device": device, **workload.inputs}

    def call() -> tuple[float, float]:
        forget_tables()  # a new input's build: plans over an unchanged input reuse its range tables
        wall, cpu = time.perf_counter(), time.process_time()
        workload.kernel.plan(BUILD_LENGTH, BUILD_LENGTH, block=(TILE, TILE), **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    call()  # warm-up: the pattern's first plan
    times = [call() for _ in range(reps)]
    return {
        "pattern": name,
        "label": workload.label,
        "length": BUILD_LENGTH,
        "median_ms": 1e3 * statistics.median(t[0] for t in times),
        "median_cpu_ms": 1e3 * statistics.median(t[1] for t in times),
        "wall_ms": [1e3 * t[0] for t in times],
        "cpu_ms": [1e3 * t[1] for t in times],
    }


def _commit() -> str:
    """The checkout's commit, `+uncommitted` when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
        return git("rev-parse", "--short", "HEAD").strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {len(os.sched_getaffinity(0))} cores"
    except OSError:
        pass
    return platform.processor() or "unknown"


def _slug(device: torch.device) -> str:
    """The device in a file name: `amd-epyc-2-cores` (the CPU's first two words and its cores), or the GPU's
    name."""
    if device.type == "cuda":
        words = torch.cuda.get_device_name(device).lower().split()
    else:
        words = [*_cpu().split(",")[0].lower().split()[:2], str(len(os.sched_getaffinity(0))), "cores"]
    return "-".join(words)


def table(records: list[dict[str, Any]]) -> str:
    """The Markdown table: at 128 x 128 against Flex's BlockMask (= the exact tile map), then at each
    other tile size attnc's plan and the exact map, both over ideal."""
    others = [tuple(t["tile"]) for t in records[0]["by_tile"][1:]] if records else []
    head = [
        "pattern", "tokens", "ideal (allowed pairs)", "attnc plan work / ideal",
        "Flex BlockMask work / ideal", "attnc / exact tile map", "attnc FULL tiles / Flex's",
        *(f"at {tm} x {tn}: attnc / ideal (exact map / ideal)" for tm, tn in others),
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in records:
        attnc, flex = r["attnc"], r["flex"]
        cells = [
            r["label"],
            f"{r['length'] // 1024}K",
            f"{r['ideal_pairs']:,}",
            f"{r['attnc_work_over_ideal']:.2f}x",
            f"{r['flex_work_over_ideal']:.2f}x",
            f"{r['attnc_work_over_exact_tiles']:.2f}x",
            f"{attnc['full_tiles']:,} / {flex['full_tiles']:,}",
            *(
                f"{t['attnc_work_over_ideal']:.2f}x ({t['exact_work_over_ideal']:.2f}x)"
                for t in r["by_tile"][1:]
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tile(text: str) -> Tile:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=list(LENGTHS))
    parser.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=list(PATTERNS))
    parser.add_argument(
        "--build", nargs="*", choices=list(PATTERNS), default=["document_causal", "block_sparse"]
    )
    parser.add_argument(
        "--tiles",
        type=_tile,
        nargs="*",
        default=list(TILES),
        help="tile sizes besides 128x128, as ROWSxCOLS (default: 128x64 32x64)",
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--label", default="after", help="names the result file (e.g. before / after)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (below the idle cores on a shared machine: see plan_cost.py)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    records = []
    for length in args.lengths:
        for name in args.patterns:
            record = measure(name, length, device, args.tiles)
            at_tiles = ", ".join(
                f"{t['tile'][0]}x{t['tile'][1]} {t['attnc_work_over_ideal']:.3f}x"
                for t in record["by_tile"][1:]
            )
            print(
                f"{name:16} {length:>6}: attnc {record['attnc_work_over_ideal']:.3f}x, "
                f"Flex {record['flex_work_over_ideal']:.3f}x of ideal; {at_tiles}",
                flush=True,
            )
            records.append(record)
    builds = []
    for name in args.build:
        builds.append(build_time(name, args.reps, device))
        build = builds[-1]
        print(
            f"plan build {name} at {BUILD_LENGTH}: {build['median_ms']:.1f} ms "
            f"(CPU {build['median_cpu_ms']:.1f} ms)",
            flush=True,
        )
    device_name = _cpu() if device.type == "cpu" else torch.cuda.get_device_name(device)
    date = datetime.date.today().isoformat()
    output = (
        args.output or ROOT / "benchmarks" / "results" / f"plan_work-{args.label}-{_slug(device)}-{date}.json"
    )
    result = {
        "script": "benchmarks/plan_work.py",
        "label": args.label,
        "commit": _commit(),
        "date": date,
        "device": device_name,
        "torch": torch.__version__,
        "tile": [TILE, TILE],
        "tiles": [list(t) for t in args.tiles],
        "flex_method": "computed with torch from the dense mask_mod (blocks of 128 x 128 with any / all "
        "pairs allowed), as create_block_mask does; FlexAttention itself not run",
        "batch": 1,
        "heads": 1,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "records": records,
        "plan_build": builds,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(table(records))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
