"""BigBird's random blocks: draw the seeded table of random key blocks in PyTorch and pass it to
examples/bigbird.attn as an input; run the kernel and check it against the dense oracle.

    .venv/bin/python examples/bigbird.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import attnc
from attnc.testing import compare

BIGBIRD = Path(__file__).with_name("bigbird.attn")
RANDOM_BLOCKS = 3  # the table's width: bigbird.attn reads random_blocks[qb, 0..2]


def random_block_table(num_blocks: int, seed: int, r: int = RANDOM_BLOCKS) -> torch.Tensor:
    """int32 [num_blocks, r]: for each query block that is not global (neither the first nor the last
    block), r distinct key blocks drawn uniformly, with a generator seeded by `seed`, from the blocks
    that the window (abs(qb - kb) <= 1) and the global blocks leave out. -1 (no block) fills the rows of
    the global blocks and the places where fewer than r blocks are left to draw from."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.full((num_blocks, r), -1, dtype=torch.int32)
    for qb in range(1, num_blocks - 1):
        candidates = torch.tensor(
            [kb for kb in range(1, num_blocks - 1) if abs(kb - qb) > 1], dtype=torch.int32
        )
        drawn = candidates[torch.randperm(len(candidates), generator=generator)[:r]]
        table[qb, : len(drawn)] = drawn
    return table


def main(seq_len: int = 512, block: int = 32, heads: int = 2, dim: int = 16, seed: int = 0) -> float:
    """Run BigBird attention on random q, k, v; print the density and the check against the oracle.
    Returns the fraction of (query, key) pairs the pattern allows."""
    kernel = attnc.load(BIGBIRD).bigbird(block=block)
    num_blocks = -(-seq_len // block)
    table = random_block_table(num_blocks, seed)
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq_len, dim, generator=generator) for _ in range(3))
    if torch.cuda.is_available():
        q, k, v, table = (t.cuda() for t in (q, k, v, table))
    out, lse = kernel(q, k, v, random_blocks=table, return_lse=True)
    comparison = compare(kernel, out, lse, q, k, v, random_blocks=table)
    density = kernel.mask(seq_len, seq_len, random_blocks=table.cpu()).float().mean().item()
    print(f"bigbird(block={block}) over {seq_len} tokens ({num_blocks} blocks), random table seed {seed}:")
    print(f"  random key blocks of query blocks 1..{num_blocks - 2}: {table[1:-1].tolist()}")
    print(f"  {100 * density:.1f}% of (query, key) pairs allowed")
    print(f"  kernel vs float64 oracle: {comparison.describe()}")
    if not comparison.ok:
        raise SystemExit(1)
    return density


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.seq_len, args.block, seed=args.seed)
