"""Train a small transformer whose attention is a sliding window with attention sinks
(examples/streaming_llm.attn) for a few steps of next-token prediction on random data, and print the
loss going down. Gradients flow through attnc's fused backward kernels.

    .venv/bin/python examples/train_sliding_window.py

On a GPU the kernels run compiled; without one they run under Triton's interpreter on the CPU, so the
defaults are tiny.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import attnc

STREAMING_LLM = Path(__file__).with_name("streaming_llm.attn")


class SlidingWindowAttention(nn.Module):
    """Multi-head self-attention whose pattern is an attnc kernel: causal, a window of `window` keys,
    plus the first `sinks` tokens."""

    def __init__(self, dim: int, heads: int, window: int, sinks: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.kernel = attnc.load(STREAMING_LLM).streaming_llm(window=window, sinks=sinks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        # [B, L, 3 * D] -> three [B, H, L, D / H]
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = self.kernel(q, k, v)  # [B, H, L, D / H]
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """A pre-norm transformer block: attention, then an MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int, window: int, sinks: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SlidingWindowAttention(dim, heads, window, sinks)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token embedding, learned positions, one block, a linear head over the vocabulary."""

    def __init__(self, vocab: int, length: int, dim: int, heads: int, window: int, sinks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(length, dim))
        self.block = Block(dim, heads, window, sinks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.block(x)))


def main(
    steps: int = 12,
    batch: int = 4,
    length: int = 64,
    dim: int = 32,
    heads: int = 2,
    window: int = 16,
    sinks: int = 2,
    vocab: int = 32,
    seed: int = 0,
) -> list[float]:
    """Train on one fixed batch of random token sequences (the model learns to predict them); return
    the loss of every step."""
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TinyLM(vocab, length, dim, heads, window, sinks).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, vocab, (batch, length + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = []
    for step in range(steps):
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    main(steps=args.steps, length=args.length)
