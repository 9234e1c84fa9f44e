"""`make demo`: an example pattern end to end — its IR, its tile map, and its fused kernel run and
checked against the dense oracle, on the GPU or, without one, under Triton's interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import attnc
from attnc.run import run
from attnc.show import render, tile_view

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "streaming_llm.attn"
SOURCE = """\
pattern streaming_llm(window: int = 1024, sinks: int = 4) {
    mask = kv <= q and (q - kv < window or kv < sinks)
}
"""


def main() -> int:
    module = attnc.load(EXAMPLE) if EXAMPLE.exists() else attnc.loads(SOURCE, "streaming_llm.attn")
    params = {"window": 96, "sinks": 16}
    kernel = module.streaming_llm(**params)
    print(f"== {EXAMPLE.name}: streaming_llm({', '.join(f'{k}={v}' for k, v in params.items())})\n")
    print(f"-- IR after canonicalize\n{kernel.ir('canonicalize')}")
    print(
        "(`attnc ir` shows every pass: classify-tiles, derive-ranges, block-sparsify, fuse, lower-triton)\n"
    )
    print("-- tile map, 512 queries x 512 keys, tiles of 32 x 32")
    print(render(tile_view(kernel, 512, 512, block=(32, 32))))
    print("-- the fused Triton kernel vs the float64 oracle")
    report = run(kernel, (1, 2, 512, 64), kv_heads=1, dtype="float16", repeats=2)
    print(report.describe())
    source = kernel.ir("lower-triton")
    lines = len(source.splitlines())
    print(f"(the kernel's Triton source: {lines} lines; `attnc ir {EXAMPLE.name} --after lower-triton`)")
    return 0 if report.comparison is not None and report.comparison.ok else 1


if __name__ == "__main__":
    sys.exit(main())
