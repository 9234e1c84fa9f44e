"""Context parallelism, simulated on the CPU from tile censuses: per-rank work and bytes received for
attnc's dispatch against the two usual splits (issue 22; `docs/distributed.md`).

For each mask and each world size (8K tokens per rank), three layouts of one sequence:

- `attnc`: `ContextParallel(kern, world_size=R).dispatch(L, **inputs)` (default chunk), each rank
  receiving exactly the key/value chunks its queries visit (`Layout.receives`);
- `head_tail`: the sequence in 2R equal runs, rank r holding runs r and 2R-1-r (the "zigzag" split of
  PyTorch's context parallel and ring-flash-attention), with an all-gather of K and V;
- `contiguous_ring`: rank r holding the r-th L/R tokens, K and V passed around a full ring.

Costs are tile-weighted by the same `CostModel` for all three (PARTIAL and FULL tiles, forward and
backward apart) and come from the same exact tile census; imbalance is the largest rank's cost over the
mean. Bytes are K and V rows received per rank, batch 1, one head of 128 bf16 elements: their ratios
do not depend on those. An all-gather and a full ring both receive (R-1)/R of K and V on every rank.
`lower_bound` is attnc's heaviest query chunk plus the cheapest others a rank must hold with it (every
rank holds at least `num_chunks // R`), over the mean rank load: no layout of whole chunks of that
size balances better. `tile_row_bound` (64 ranks only: it needs a census at 256-token chunks) is the
same bound for chunks of a single 128-query tile row, the finest split of the queries: where it is far
above 1 (a global token's row), only splitting one query row's keys over several ranks could balance.
Where the dispatch splits a heavy query chunk by its keys (`parts` > 0: other ranks compute it
against their key chunks and return partial outputs; `docs/distributed.md`, "Split query chunks"),
`whole_chunks` gives the same figures for the dispatch without splits (`split_target=inf`: the layout
before splitting existed), and the bytes include the query chunks and partial outputs received.
`dispatch_s` times the whole `dispatch` call (census, assignment, default-chunk choice) on one thread
after a warm-up, wall time (median, min) and process CPU time (median of `--reps`; the README shows
it: the machine is shared, and one thread's CPU time moves less with the load than wall time);
`range_tables_cpu_s` times, apart, the part of it that builds the inputs' range-min/max tables
(`distributed.census.BlockRangeTable`, over 128-token blocks), which
data-dependent masks need once per dispatch.

    .venv/bin/python benchmarks/context_parallel.py \
        --out benchmarks/results/context_parallel-<device>-<date>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import attnc
from attnc.distributed import ContextParallel, CostModel, tile_census
from attnc.distributed.assign import contiguous, head_tail
from attnc.distributed.census import BlockRangeTable

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOKENS_PER_RANK = 8192
HEAD_DIM, DTYPE_BYTES = 128, 2

SHARE_QUESTION = attnc.loads(
    """
# Shared question (FlashMask, Wang et al. 2024): groups of a question followed by several answers packed
# in one row; a token sees, causally, its group's question and its own answer, never another answer.
# `group[b, i]` is the group of position i, `answer[b, i]` 0 in the question and 1, 2, ... per answer.
pattern share_question {
    input group: int32[BATCH, KV_LEN]
    input answer: int32[BATCH, KV_LEN]
    mask = kv <= q and group[b, q] == group[b, kv] and (answer[b, kv] == 0 or answer[b, kv] == answer[b, q])
}
""",
    "share_question.attn",
).share_question()


def document_lengths(total: int, generator: torch.Generator) -> list[int]:
    """Long-tailed document lengths summing to `total`: log-normal with median 512 (sigma 1, capped at
    8K), and one document in 50 uniform in [8K, 32K]."""
    lengths: list[int] = []
    while sum(lengths) < total:
        if float(torch.rand(1, generator=generator)) < 0.02:
            length = int(torch.randint(8192, 32769, (1,), generator=generator))
        else:
            length = int(512 * float(torch.exp(torch.randn(1, generator=generator))))
            length = min(max(length, 16), 8192)
        lengths.append(min(length, total - sum(lengths)))
    return lengths


def ids(lengths: list[int]) -> torch.Tensor:
    """Segment ids 0, 1, ... of consecutive segments of these lengths, int32 [1, sum]."""
    counts = torch.tensor(lengths)
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), counts).reshape(1, -1)


def share_question_inputs(total: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Groups of a question (256..2048 tokens) and 2..8 answers (64..1024 tokens each)."""
    group, answer = [], []
    g = 0
    while len(group) < total:
        question = int(torch.randint(256, 2049, (1,), generator=generator))
        group += [g] * question
        answer += [0] * question
        for a in range(1, int(torch.randint(2, 9, (1,), generator=generator)) + 1):
            length = int(torch.randint(64, 1025, (1,), generator=generator))
            group += [g] * length
            answer += [a] * length
        g += 1
    as_row = lambda xs: torch.tensor(xs[:total], dtype=torch.int32).reshape(1, -1)  # noqa: E731
    return {"group": as_row(group), "answer": as_row(answer)}


def masks(seq_len: int, seed: int) -> dict[str, tuple[attnc.Kernel, dict[str, Any]]]:
    """The masks of issue 22's benchmark at `seq_len` tokens, with their inputs (seeded)."""
    std = attnc.stdlib()
    generator = torch.Generator().manual_seed(seed)
    document = attnc.load(EXAMPLES / "document_causal.attn").document_causal()
    is_global = torch.zeros((1, seq_len), dtype=torch.bool)
    is_global[0, :64] = True  # a question's tokens, at the start (Longformer's question answering)
    return {
        "causal": (std.causal(), {}),
        "sliding_window_1024": (std.sliding_window(window=1024), {}),
        "document_causal": (document, {"doc": ids(document_lengths(seq_len, generator))}),
        "prefix_lm_quarter": (std.prefix_lm(prefix=seq_len // 4), {}),
        "share_question": (SHARE_QUESTION, share_question_inputs(seq_len, generator)),
        "longformer_global_512": (
            attnc.load(EXAMPLES / "longformer.attn").longformer_global(w=512),
            {"is_global": is_global},
        ),
    }


def rank_costs(
    kern: attnc.Kernel, inputs: dict[str, Any], seq_len: int, chunk: int, owner: torch.Tensor, ranks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward cost per rank of a fixed split, float64 [ranks] (`CostModel` weights)."""
    model = CostModel()
    census = tile_census(kern, seq_len, chunk=chunk, batch=1, num_heads=1, **inputs)
    partial, full = census.partial.sum(1).double(), census.full.sum(1).double()
    forward = model.forward_partial * partial + model.forward_full * full
    backward = model.backward_partial * partial + model.backward_full * full
    per_rank = lambda cost: torch.zeros(ranks, dtype=torch.float64).index_add_(0, owner, cost)  # noqa: E731
    return per_rank(forward), per_rank(backward)


def heaviest_rank(chunk_cost: torch.Tensor, held: int) -> float:
    """The least load of a rank holding the heaviest chunk and `held - 1` others."""
    ordered = torch.sort(chunk_cost).values
    return float(ordered[-1] + ordered[: max(held - 1, 0)].sum())


def tile_row_bound(kern: attnc.Kernel, inputs: dict[str, Any], seq_len: int, ranks: int) -> float:
    """`heaviest_rank` for chunks of one 128-query tile row (the halves of 256-token chunks), over the
    mean rank load, the larger of forward and backward."""
    model = CostModel()
    census = tile_census(kern, seq_len, chunk=256, batch=1, num_heads=1, **inputs)
    bounds = []
    for w_partial, w_full in (
        (model.forward_partial, model.forward_full),
        (model.backward_partial, model.backward_full),
    ):
        rows = (w_partial * census.half_partial.double() + w_full * census.half_full.double()).flatten()
        bounds.append(heaviest_rank(rows, len(rows) // ranks) / float(rows.sum() / ranks))
    return max(bounds)


def imbalance(cost: torch.Tensor) -> float:
    return float(cost.max() / cost.mean()) if float(cost.mean()) > 0 else 1.0


def timed(call: Callable[[], Any], reps: int) -> tuple[Any, list[float], list[float]]:
    """The call's result, and its wall and process CPU times (seconds) over `reps` calls after one."""
    result = call()  # warm-up: compiles nothing, but fills the caches of the pattern's analyses
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return result, wall, cpu


def run_case(name: str, kern: attnc.Kernel, inputs: dict[str, Any], ranks: int, reps: int) -> dict[str, Any]:
    seq_len = ranks * TOKENS_PER_RANK
    all_gather = (ranks - 1) * TOKENS_PER_RANK * 2 * HEAD_DIM * DTYPE_BYTES
    cp = ContextParallel(kern, world_size=ranks)
    layout, times, cpu = timed(lambda: cp.dispatch(seq_len, **inputs), reps)
    _, _, tables = timed(lambda: [BlockRangeTable.build(x, x.dim() - 1, 128) for x in inputs.values()], reps)
    stats = layout.stats(head_dim=HEAD_DIM, dtype=torch.bfloat16)
    forward = torch.tensor([s["forward_cost"] for s in stats], dtype=torch.float64)
    backward = torch.tensor([s["backward_cost"] for s in stats], dtype=torch.float64)
    received = max(int(s["bytes_received"]) for s in stats)
    held = layout.num_chunks // ranks
    bound = max(
        heaviest_rank(torch.tensor(cost, dtype=torch.float64), held) / float(per_rank.mean())
        for cost, per_rank in ((layout.forward, forward), (layout.backward, backward))
    )
    result: dict[str, Any] = {
        "mask": name,
        "ranks": ranks,
        "seq_len": seq_len,
        "all_gather_bytes_per_rank": all_gather,
        "attnc": {
            "chunk": layout.chunk,
            "forward_imbalance": imbalance(forward),
            "backward_imbalance": imbalance(backward),
            "lower_bound": max(1.0, bound),
            "max_bytes_received": received,
            "bytes_vs_all_gather": received / all_gather,
            "max_chunks_received": max(int(s["chunks_received"]) for s in stats),
            "parts": len(layout.parts),
            "max_query_chunks_received": max(int(s["query_chunks_received"]) for s in stats),
            "max_partials_received": max(int(s["partials_received"]) for s in stats),
            "dispatch_s_median": statistics.median(times),
            "dispatch_s_min": min(times),
            "dispatch_cpu_s_median": statistics.median(cpu),
            "range_tables_cpu_s_median": statistics.median(tables),
        },
    }
    if layout.parts:
        whole = ContextParallel(kern, world_size=ranks, split_target=float("inf")).dispatch(seq_len, **inputs)
        whole_stats = whole.stats(head_dim=HEAD_DIM, dtype=torch.bfloat16)
        whole_received = max(int(s["bytes_received"]) for s in whole_stats)
        result["attnc"]["whole_chunks"] = {
            "chunk": whole.chunk,
            "forward_imbalance": imbalance(
                torch.tensor([s["forward_cost"] for s in whole_stats], dtype=torch.float64)
            ),
            "backward_imbalance": imbalance(
                torch.tensor([s["backward_cost"] for s in whole_stats], dtype=torch.float64)
            ),
            "max_bytes_received": whole_received,
            "bytes_vs_all_gather": whole_received / all_gather,
        }
    if ranks == 64:
        result["attnc"]["tile_row_bound"] = max(1.0, tile_row_bound(kern, inputs, seq_len, ranks))
    if "doc" in inputs:
        lengths = torch.unique_consecutive(inputs["doc"][0], return_counts=True)[1]
        result["documents"] = {
            "count": len(lengths),
            "median_length": int(lengths.median()),
            "at_least_8k": int((lengths >= 8192).sum()),
            "longest": int(lengths.max()),
        }
    for split, chunk, owner in (
        ("head_tail", seq_len // (2 * ranks), head_tail(2 * ranks, ranks)),
        ("contiguous_ring", seq_len // ranks, contiguous(ranks, ranks)),
    ):
        assert owner is not None
        f, b = rank_costs(kern, inputs, seq_len, chunk, owner, ranks)
        result[split] = {
            "forward_imbalance": imbalance(f),
            "backward_imbalance": imbalance(b),
            "max_bytes_received": all_gather,
        }
    return result


def markdown(path: Path, ranks: int) -> str:
    """The README table of a results file: every mask at `ranks` ranks, dispatch time at the largest."""
    rows = json.loads(path.read_text())["results"]
    largest = max(r["ranks"] for r in rows)
    times = {r["mask"]: r["attnc"] for r in rows if r["ranks"] == largest}
    lines = [
        f"| mask ({ranks} ranks x 8K) | attnc fwd / bwd | bound (tile row) | head-tail fwd / bwd "
        f"| ring fwd / bwd | attnc bytes vs all-gather "
        f"| dispatch at {largest} ranks, CPU time (range tables) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["ranks"] != ranks:
            continue
        a, h, c, t = r["attnc"], r["head_tail"], r["contiguous_ring"], times[r["mask"]]
        lines.append(
            f"| {r['mask']} | {a['forward_imbalance']:.3f} / {a['backward_imbalance']:.3f} | "
            f"{a['lower_bound']:.3f} ({a.get('tile_row_bound', float('nan')):.3f}) | "
            f"{h['forward_imbalance']:.3f} / {h['backward_imbalance']:.3f} | "
            f"{c['forward_imbalance']:.3f} / {c['backward_imbalance']:.3f} | "
            f"{a['bytes_vs_all_gather'] * 100:.1f}% | {t['dispatch_cpu_s_median'] * 1e3:.0f} ms "
            f"({t['range_tables_cpu_s_median'] * 1e3:.0f} ms) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 96])
    parser.add_argument("--mask", action="append", help="only these masks (repeatable)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path, help="print the README table of a results file and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.markdown, 64))
        return
    torch.set_num_threads(1)
    results = []
    for ranks in args.ranks:
        for name, (kern, inputs) in masks(ranks * TOKENS_PER_RANK, args.seed + ranks).items():
            if args.mask and name not in args.mask:
                continue
            row = run_case(name, kern, inputs, ranks, args.reps)
            a, h, c = row["attnc"], row["head_tail"], row["contiguous_ring"]
            print(
                f"{name:22s} R={ranks:3d} chunk={a['chunk']:5d} attnc fwd {a['forward_imbalance']:.3f} "
                f"bwd {a['backward_imbalance']:.3f} (bound {a['lower_bound']:.3f}) bytes "
                f"{a['bytes_vs_all_gather']:.3f} of all-gather, parts {a['parts']}, "
                f"dispatch {a['dispatch_s_median'] * 1e3:.0f} ms "
                f"(CPU {a['dispatch_cpu_s_median'] * 1e3:.0f} ms)"
                f" | head-tail {h['forward_imbalance']:.3f}/{h['backward_imbalance']:.3f}"
                f" | ring {c['forward_imbalance']:.3f}/{c['backward_imbalance']:.3f}",
                flush=True,
            )
            results.append(row)
    if args.out:
        meta = {
            "benchmark": "context_parallel",
            "tokens_per_rank": TOKENS_PER_RANK,
            "head_dim": HEAD_DIM,
            "dtype_bytes": DTYPE_BYTES,
            "cost_model": vars(CostModel()),
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "attnc": attnc.__version__,
            "seed": args.seed,
        }
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
