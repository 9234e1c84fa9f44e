"""Packed sequences with document masking: several documents of different lengths share one row of the
batch, and examples/document_causal.attn keeps each token inside its own document. The document ids are
built from the list of lengths; the result equals running causal attention on each document alone.

    .venv/bin/python examples/packed_documents.py 5 17 9 33
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

import attnc

DOCUMENT_CAUSAL = Path(__file__).with_name("document_causal.attn")


def document_ids(lengths: Sequence[int]) -> torch.Tensor:
    """int32 [sum(lengths)]: the document index of every position, e.g. [2, 3] -> [0, 0, 1, 1, 1]."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(torch.int32)


def main(lengths: Sequence[int] = (5, 17, 9, 33), heads: int = 2, dim: int = 16, seed: int = 0) -> float:
    """Attend over the packed documents, compare each document's rows with causal attention over that
    document alone; print and return the largest difference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = list(lengths)
    total = sum(lengths)
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, total, dim, generator=generator).to(device) for _ in range(3))
    doc = document_ids(lengths)[None].to(device)  # [BATCH = 1, KV_LEN]

    packed = attnc.load(DOCUMENT_CAUSAL).document_causal()
    out = packed(q, k, v, doc=doc)

    causal = attnc.stdlib().causal()
    largest = 0.0
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        alone = causal(q[:, :, part], k[:, :, part], v[:, :, part])
        largest = max(largest, (out[:, :, part] - alone).abs().max().item())
        start += length
    density = packed.mask(total, total, doc=doc.cpu()).float().mean().item()
    print(f"{len(lengths)} documents of lengths {lengths} packed into {total} positions")
    print(f"pairs attended: {100 * density:.1f}% of the {total} x {total} matrix")
    print(f"largest difference from attending to each document alone: {largest:.2e}")
    return largest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lengths", type=int, nargs="*", default=[5, 17, 9, 33], help="document lengths")
    main(parser.parse_args().lengths)
