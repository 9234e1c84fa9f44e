"""Decoding against a paged KV cache: attnc's `kern.decode` vs FlexAttention's decoding path and SDPA.

For each pattern (causal, sliding window 4096, StreamingLLM with 4 sinks and a 4096 window), new-token
count Lq (1, 4), batch (1, 8, 64) and context (4K, 32K, 128K): Hq 32, Hkv 8, head dim 128, bfloat16, a
cache in shuffled pages of 16 rows. Every system's output is checked against a dense float32 reference
on the same cache before anything is timed; a system that fails the check is reported, not timed.

- attnc: `kern.decode(q, k_pages, v_pages, cache_seqlens=lens, block_table=table)`, the paged cache as is;
- SDPA: `scaled_dot_product_attention` on the contiguous cache (gathered once, outside the timing) with
  the pattern's boolean mask for the new rows (`kern.mask(..., q_offset=...)`) and `enable_gqa=True`;
- FlexAttention: compiled `flex_attention` on the contiguous cache with a `BlockMask` from
  `create_block_mask` of the same mask (Lq < 128 takes its decoding kernel), `enable_gqa=True`.

Per row: time (median of `triton.testing.do_bench`), and for attnc the bytes of K and V rows the
pattern's visited tiles hold divided by the time, as a fraction of the device's HBM peak (a table of
known peaks; `--peak-gbs` for another device). Goals (issue 21): >= 80% of peak on causal at 32K, and a
sliding-window time that does not grow with the context.

    .venv/bin/python benchmarks/decode.py --out benchmarks/results/decode-<device>-<date>.json   # GPU
    .venv/bin/python benchmarks/decode.py --smoke      # CPU, Triton's interpreter: tiny sizes, checks only

`--contexts` picks the cache lengths; `--time-budget-s S` starts no case after S seconds (the rest are
recorded as skipped) and the JSON is rewritten after every case.

`--smoke` runs every pattern and both Lq at tiny sizes (context 40-200, Hq 4, Hkv 2, d 16, float32,
ragged lengths with an empty row) and checks attnc and SDPA against the reference; no timing. CI runs it
(tests/test_decode_bench.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import attnc

ROOT = Path(__file__).resolve().parent.parent
STD = attnc.stdlib()
STREAMING = attnc.load(ROOT / "examples" / "streaming_llm.attn")
PAGE = 16
HBM_PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def kernels(window: int) -> dict[str, attnc.Kernel]:
    return {
        "causal": STD.causal(),
        f"sliding_window_{window}": STD.sliding_window(window=window),
        f"streaming_llm_{window}_4": STREAMING.streaming_llm(window=window, sinks=4),
    }


def paged_cache(
    k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A contiguous cache [B, Hkv, L, D] as shuffled pages [pages, PAGE, Hkv, D] and its block table."""
    batch, kv_heads, length, dim = k.shape
    per_row = -(-length // PAGE)
    order = torch.randperm(batch * per_row, generator=torch.Generator().manual_seed(seed)).to(k.device)
    table = order.reshape(batch, per_row).to(torch.int32)
    result = []
    for source in (k, v):
        padded = torch.zeros((batch, kv_heads, per_row * PAGE, dim), dtype=k.dtype, device=k.device)
        padded[:, :, :length] = source
        # [B, per_row, PAGE, Hkv, D] in (row, page) order, stored at the pages the table names.
        rows = padded.reshape(batch, kv_heads, per_row, PAGE, dim).permute(0, 2, 3, 1, 4)
        pages = torch.empty((batch * per_row, PAGE, kv_heads, dim), dtype=k.dtype, device=k.device)
        pages[table.long().reshape(-1)] = rows.reshape(-1, PAGE, kv_heads, dim)
        result.append(pages)
    k_pages, v_pages = result
    return k_pages, v_pages, table


def dense_mask(kern: attnc.Kernel, q_len: int, length: int, lens: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, Lq, L]: the pattern's mask for each row's new queries, keys past its length off."""
    rows = []
    for n in lens.tolist():
        if n == 0:
            rows.append(torch.zeros(1, 1, q_len, length, dtype=torch.bool, device=lens.device))
            continue
        mask = kern.mask(q_len, n, q_offset=n - q_len).to(lens.device)
        rows.append(torch.nn.functional.pad(mask, (0, length - n)).expand(1, 1, q_len, length))
    return torch.cat(rows)


def reference(q, k, v, mask) -> torch.Tensor:
    """Dense float32 attention with a boolean mask (rows with no key: 0), GQA by repetition."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)


def visited_bytes(
    kern: attnc.Kernel, q_len: int, lens: torch.Tensor, kv_heads: int, dim: int, size: int
) -> int:
    """Bytes of K and V in the key tiles (PAGE rows) the pattern lets each row's queries visit."""
    total = 0
    for n in lens.tolist():
        if n == 0:
            continue
        tiles = kern.block_map(q_len, n, block=(max(16, q_len), PAGE), q_offset=n - q_len)
        rows = int((tiles[0, 0] > 0).any(0).sum()) * PAGE
        total += 2 * min(rows, n) * kv_heads * dim * size
    return total


def check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> dict[str, Any]:
    error = float((got.float() - want).abs().max()) if got.numel() else 0.0
    return {"system": name, "max_abs_error": error, "passed": error <= atol}


def run_case(
    kern_name: str, kern: attnc.Kernel, batch: int, q_len: int, length: int, smoke: bool, device: torch.device
) -> dict[str, Any]:
    heads, kv_heads, dim = (4, 2, 16) if smoke else (32, 8, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    atol = 1e-4 if smoke else 2e-2
    g = torch.Generator().manual_seed(batch * 7919 + length)
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(device, dtype)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=g).to(device, dtype) for _ in range(2))
    if smoke:  # ragged lengths, one empty row
        lens = torch.randint(q_len, length + 1, (batch,), generator=g)
        lens[0] = 0
    else:
        lens = torch.full((batch,), length)
    lens = lens.to(device=device, dtype=torch.int32)
    k_pages, v_pages, table = paged_cache(k, v, lens, seed=length)
    mask = dense_mask(kern, q_len, length, lens)
    want = reference(q, k, v, mask)
    case: dict[str, Any] = {
        "pattern": kern_name,
        "batch": batch,
        "q_len": q_len,
        "context": length,
        "results": [],
    }
    systems: dict[str, Any] = {
        "attnc": lambda: kern.decode(q, k_pages, v_pages, cache_seqlens=lens, block_table=table),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True
        ).nan_to_num(0.0),
    }
    if not smoke:
        systems["flex"] = flex_call(q, k, v, mask)
    for name, call in systems.items():
        with torch.no_grad():
            result = check(name, call(), want, atol)
        if result["passed"] and not smoke:
            import triton.testing

            result["ms"] = float(triton.testing.do_bench(call, warmup=25, rep=200))
            if name == "attnc":
                size = torch.empty((), dtype=dtype).element_size()
                result["visited_bytes"] = visited_bytes(kern, q_len, lens[:1], kv_heads, dim, size) * batch
                result["gb_per_s"] = result["visited_bytes"] / result["ms"] / 1e6
        case["results"].append(result)
    return case


def flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> Any:
    """Compiled FlexAttention over the contiguous cache with a BlockMask of `mask` (the same tiles)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dense = mask

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b, 0, q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, checks only")
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument("--peak-gbs", type=float, help="the device's HBM peak in GB/s")
    parser.add_argument(
        "--contexts", type=int, nargs="+", help="cache lengths to run (default 4096 32768 131072)"
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        help="start no case after this many seconds; the rest are recorded as skipped (the JSON is "
        "rewritten after every case, so a run cut short keeps what it finished)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        grid = [(b, q_len, n) for b in (2,) for q_len in (1, 4) for n in (40, 200)]
        window = 24
    else:
        contexts = args.contexts or (4096, 32768, 131072)
        grid = [(b, q_len, n) for b in (1, 8, 64) for q_len in (1, 4) for n in contexts]
        window = 4096
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_gbs or next((v for key, v in HBM_PEAK_GBS.items() if key in device_name), None)
    report: dict[str, Any] = {
        "benchmark": "decode",
        "device": device_name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "hbm_peak_gbs": peak,
        "cases": [],
        "skipped": [],
    }
    cases, skipped = report["cases"], report["skipped"]
    for name, kern in kernels(window).items():
        for batch, q_len, length in grid:
            if not args.smoke and batch * length > 64 * 32768:  # cache memory: at most 16 GiB of K and V
                continue
            if args.time_budget_s is not None and time.monotonic() - started > args.time_budget_s:
                skipped.append({"pattern": name, "batch": batch, "q_len": q_len, "context": length})
                continue
            case = run_case(name, kern, batch, q_len, length, args.smoke, device)
            for result in case["results"]:
                if peak and "gb_per_s" in result:
                    result["fraction_of_peak"] = result["gb_per_s"] / peak
            cases.append(case)
            print(json.dumps(case), flush=True)
            if args.out:
                args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if skipped:
        print(f"{len(skipped)} cases skipped after --time-budget-s {args.time_budget_s}", file=sys.stderr)
    failed = [
        (c["pattern"], c["batch"], c["q_len"], c["context"], r["system"])
        for c in cases
        for r in c["results"]
        if not r["passed"]
    ]
    if failed:
        print(f"checks failed: {failed}", file=sys.stderr)
        return 1
    print(f"{len(cases)} cases, every result checked against the reference", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
