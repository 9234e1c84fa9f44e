"""2-D neighbourhood attention over an image feature map (NAT, Hassani et al. 2023): every pixel attends
to the kernel x kernel pixels around it, the window shifted inward at the borders. The feature map
[B, C, H, W] is flattened row-major into H * W tokens, attended with examples/natten.attn's `nat_2d`,
and folded back.

    .venv/bin/python examples/image_neighborhood.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import attnc
from attnc.testing import compare

NATTEN = Path(__file__).with_name("natten.attn")


class NeighborhoodAttention2d(nn.Module):
    """Self-attention of a [B, C, H, W] feature map over kernel x kernel neighbourhoods."""

    def __init__(self, channels: int, heads: int, height: int, width: int, kernel: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.kernel = attnc.load(NATTEN).nat_2d(height=height, width=width, kernel=kernel)

    def qkv_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, heads, H * W, C / heads], tokens in row-major order (y * W + x)."""
        batch, channels, height, width = x.shape
        qkv = self.qkv(x).view(batch, 3, self.heads, channels // self.heads, height * width)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        attended = self.kernel(*self.qkv_tokens(x))  # [B, heads, H * W, C / heads]
        return self.out(attended.transpose(-1, -2).reshape(batch, channels, height, width))


def main(
    height: int = 16, width: int = 24, channels: int = 32, heads: int = 2, kernel: int = 7, seed: int = 0
) -> torch.Tensor:
    """Run the layer on a random feature map, check its attention against the dense oracle, print the
    share of pixel pairs it attends; return the output feature map."""
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = NeighborhoodAttention2d(channels, heads, height, width, kernel).to(device)
    image = torch.randn(2, channels, height, width, device=device)
    with torch.no_grad():
        out = layer(image)
        q, k, v = layer.qkv_tokens(image)
        attended, lse = layer.kernel(q, k, v, return_lse=True)
        comparison = compare(layer.kernel, attended, lse, q, k, v)
    tokens = height * width
    tiles = layer.kernel.block_map(tokens, tokens, block=(64, 64))
    print(f"{height} x {width} feature map, {channels} channels, {kernel} x {kernel} neighbourhoods")
    print(f"output {list(out.shape)}; each pixel attends to {kernel * kernel} of {tokens} pixels")
    print(f"64 x 64 tiles visited: {100 * (tiles > 0).float().mean().item():.1f}%")
    print(f"kernel vs float64 oracle: {comparison.describe()}")
    if not comparison.ok:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=16)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--kernel", type=int, default=7)
    args = parser.parse_args()
    main(args.height, args.width, kernel=args.kernel)
