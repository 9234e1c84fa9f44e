"""`make demo`: what attnc understands of an example pattern — its IR after every pass, its mask, and a
check that the compiler's simplified IR still means what the user wrote (the dense oracle decides)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import attnc
from attnc.ir import evaluate as oracle

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "streaming_llm.attn"
SOURCE = """\
pattern streaming_llm(window: int = 1024, sinks: int = 4) {
    mask = kv <= q and (q - kv < window or kv < sinks)
}
"""


def picture(mask: torch.Tensor) -> str:
    """Rows are queries, columns keys: '#' allowed, '.' masked."""
    return "\n".join("  " + "".join("#" if x else "." for x in row) for row in mask.tolist())


def main() -> int:
    module = attnc.load(EXAMPLE) if EXAMPLE.exists() else attnc.loads(SOURCE, "streaming_llm.attn")
    params = {"window": 6, "sinks": 2}
    kernel = module.streaming_llm(**params)
    print(f"== {EXAMPLE.name}: streaming_llm({', '.join(f'{k}={v}' for k, v in params.items())})\n")
    for stage, text in kernel.stages.items():
        print(f"-- IR after {stage}\n{text}")
    q_len = kv_len = 20
    mask = kernel.mask(q_len, kv_len)[0, 0]
    print(f"-- mask, {q_len} queries x {kv_len} keys ({int(mask.sum())} of {mask.numel()} pairs allowed)")
    print(picture(mask))
    env = oracle.Env(1, 1, q_len, kv_len, torch.device("cpu"), {})
    simplified = oracle.mask(kernel.pattern, env)[0, 0]
    same = bool(torch.equal(simplified, mask))
    print(f"\n-- canonicalized IR gives the same mask as the source: {'yes' if same else 'NO'}")
    q, k, v = (torch.randn(1, 2, q_len, 16, dtype=torch.float64) for _ in range(3))
    out = kernel.reference(q, k, v)
    print(
        f"-- reference attention (float64 oracle): out {list(out.shape)}, "
        f"finite: {bool(out.isfinite().all())}"
    )
    print("\nKernels (Triton) are not generated yet: the oracle is the only executor so far.")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
