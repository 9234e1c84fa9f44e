"""MoBA-style block selection (Lu et al. 2025): choose, for each query block, the top-k past key blocks
by the score of its mean-pooled queries against each block's mean-pooled keys, in PyTorch, and pass the
selection to examples/dynamic_sparse.attn's `moba` pattern as an input. attnc builds the block-sparse
launch metadata from it; the kernel never touches the blocks left out.

    .venv/bin/python examples/moba_selection.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import attnc
from attnc.testing import compare

DYNAMIC_SPARSE = Path(__file__).with_name("dynamic_sparse.attn")


def mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, ceil(L / block), D]: the mean over each block of positions (the last block
    may be shorter)."""
    batch, heads, length, dim = x.shape
    blocks = -(-length // block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - length))
    sums = padded.view(batch, heads, blocks, block, dim).sum(dim=3)
    counts = torch.full((blocks,), block, dtype=x.dtype, device=x.device)
    counts[-1] = length - (blocks - 1) * block
    return sums / counts[:, None]


def select_blocks(q: torch.Tensor, k: torch.Tensor, block: int, top_k: int) -> torch.Tensor:
    """bool [B, H, query blocks, key blocks]: for each query block, the `top_k` key blocks before it
    with the highest mean-pooled q . k (fewer when fewer blocks come before it). The query's own block
    is not selected here: the `moba` pattern always includes it, causally."""
    scores = mean_pool(q, block) @ mean_pool(k, block).transpose(-1, -2)  # [B, H, QB, KB]
    q_blocks, kv_blocks = scores.shape[-2:]
    past = (
        torch.arange(kv_blocks, device=q.device)[None, :] < torch.arange(q_blocks, device=q.device)[:, None]
    )
    scores = scores.masked_fill(~past, -torch.inf)
    top = scores.topk(min(top_k, kv_blocks), dim=-1).indices
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return selected & past  # a row with fewer than top_k past blocks picked some -inf ones: drop them


def main(
    length: int = 512, block: int = 32, top_k: int = 3, heads: int = 2, dim: int = 16, seed: int = 0
) -> torch.Tensor:
    """Select blocks for random q and k, run the `moba` kernel with them, check it against the dense
    oracle and print how much of the causal attention it computes. Returns the selection."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, dim, generator=generator).to(device) for _ in range(3))
    selected = select_blocks(q, k, block, top_k)
    kernel = attnc.load(DYNAMIC_SPARSE).moba(block=block)
    out, lse = kernel(q, k, v, selected=selected, return_lse=True)
    comparison = compare(kernel, out, lse, q, k, v, selected=selected)
    allowed = kernel.mask(length, length, selected=selected.cpu()).sum().item()
    causal = length * (length + 1) // 2 * heads
    print(f"moba(block={block}), top-{top_k} past key blocks per query block, {length} tokens, {heads} heads")
    last = selected[0, 0, -1].nonzero().flatten().tolist()
    print(f"blocks selected for the last query block of head 0: {last}")
    print(f"pairs attended: {100 * allowed / causal:.1f}% of causal attention")
    print(f"kernel vs float64 oracle: {comparison.describe()}")
    if not comparison.ok:
        raise SystemExit(1)
    return selected


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args()
    main(args.length, args.block, args.top_k)
