"""A review fuzz campaign: kernels at blocks of their own, judged by the dense oracle. The test suite runs
a bounded part of it (`tests/test_mixed_blocks.py`); this script runs it for as long as asked.

`attnc fuzz` and the corpus replay run every kernel at the interpreter's one configuration (32 x 32), so
the backward's dQ and dK/dV kernels never run there with blocks that differ from each other or from
the forward's. This script replaces the launcher's configuration choice (`launch._config`) so that the
forward, dQ and dK/dV kernels each get a block drawn from 16, 32 and 64 per side, and runs:

- `generic`: attnc's own random programs (`attnc.testing.fuzz.cases`, with gradients), each kernel's
  block chosen from a hash of its key and launch shape (deterministic, so Hypothesis can shrink);
- `conjuncts`: masks that are an `or` of 2 to 5 ranges (sinks, tails, bands, windows, block diagonals,
  row-restricted ranges, `KV_LEN`-relative ranges, residues) that overlap, nest, are empty for some
  rows or touch the sequence ends, with score modifications and a runtime window; ragged lengths,
  GQA, a batch-1 k/v broadcast; forward and gradients, blocks merged by lse from `Kernel.chunk` calls
  (forward and gradients), and `Kernel.decode` with some empty rows.

Usage (under Triton's interpreter, 2 shared cores: about 10 CPU seconds per program):

    python scripts/fuzz_mixed_blocks.py generic --seconds 600 --seed 1
    python scripts/fuzz_mixed_blocks.py conjuncts --programs 50 --seed 1

Prints one line per failure (the program, shapes and configurations) and a summary; exits 1 on any.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import random
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

import attnc
from attnc.runtime import launch
from attnc.runtime.autotune import Config
from attnc.runtime.launch import merge_splits
from attnc.testing import compare, compare_gradients

BLOCKS = (16, 32, 64)
_CHOSEN: dict[str, Config] = {}  # `conjuncts`: the configurations of the current program, by kernel


def _kernel_name(backward: bool, dkv: bool) -> str:
    return "dkv" if dkv else "dq" if backward else "forward"


def _hashed_config(seed: int):
    """A `launch._config` that gives each kernel a block from its key and shape (deterministic)."""

    def config(tuners, key, label, backend, device, shape, measure, backward=False, **kw: Any) -> Config:
        digest = hashlib.sha256(f"{seed}{key}{backward}{kw.get('dkv')}{shape}".encode()).digest()
        return Config(BLOCKS[digest[0] % 3], BLOCKS[digest[1] % 3], 1, 1)

    return config


def _chosen_config(tuners, key, label, backend, device, shape, measure, backward=False, **kw: Any) -> Config:
    """A `launch._config` that gives each kernel the block `_CHOSEN` holds for it."""
    return _CHOSEN[_kernel_name(backward, bool(kw.get("dkv")))]


def _term(r: random.Random, params: dict[str, int]) -> str:
    """One disjunct: a range of keys, most of them relative to the query."""
    a, b = r.randint(0, 40), r.randint(0, 40)
    kind = r.randrange(14)
    if kind == 3:
        params.setdefault("w", r.randint(1, 20))
        return "(kv <= q and q - kv < w)"
    return [
        f"kv < {a}",
        f"kv >= {a + 10}",
        f"(kv >= {min(a, b)} and kv < {max(a, b)})",
        "",
        f"(q - {a % 9} <= kv <= q + {b % 9})",
        f"kv > q + {a % 30}",
        f"q // {a % 13 + 1} == kv // {a % 13 + 1}",
        f"(q < {a} and kv > {b})",
        "kv <= q + KV_LEN - Q_LEN",
        f"(kv >= q + {a % 20} and kv < q + {a % 20 + b % 7 + 1})",
        f"(q >= {a} and kv <= {b})",
        f"kv == q - {a % 5}",
        f"(kv >= KV_LEN - {a % 20})",
        f"(kv <= q and kv % {a % 4 + 2} == 0)",
    ][kind]


SCORES = (
    "",
    "score = s + 0.05 * (q - kv)",
    "score = 2.0 * tanh(s / 2.0)",
    "score = s * 0.7 - 0.01 * kv",
    "score = where(kv % 3 == 0, s - 1.0, s)",
)


def _program(r: random.Random) -> tuple[str, dict[str, int]]:
    params: dict[str, int] = {}
    terms = [_term(r, params) for _ in range(r.randint(2, 5))]
    header = "(w: int)" if params else ""
    return f"pattern p{header} {{\n mask = {' or '.join(terms)}\n {r.choice(SCORES)}\n}}", params


def _check_conjuncts(r: random.Random, index: int) -> None:
    """One `conjuncts` program: forward, gradients, chunks merged by lse and decode, by the oracle."""
    source, params = _program(r)
    kern = attnc.loads(source).p(**params)
    q_len, kv_len = r.randint(1, 70), r.randint(1, 70)
    batch, kv_heads, group = r.randint(1, 2), r.randint(1, 2), r.choice((1, 1, 2))
    heads = kv_heads * group
    kv_batch = r.choice((1, batch))
    g = torch.Generator().manual_seed(index)
    q = torch.randn(batch, heads, q_len, 16, generator=g)
    k, v = (torch.randn(kv_batch, kv_heads, kv_len, 16, generator=g) for _ in range(2))
    _CHOSEN.update(
        {name: Config(r.choice(BLOCKS), r.choice(BLOCKS), 1, 1) for name in ("forward", "dq", "dkv")}
    )
    where = f"{source!r} {params} q {list(q.shape)} k/v {list(k.shape)} {_CHOSEN}"

    out, lse = kern(q, k, v, return_lse=True)
    forward = compare(kern, out, lse, q, k, v)
    assert forward.ok, f"forward: {forward.describe()}\n  {where}"
    gradients = compare_gradients(kern, q, k, v, seed=index)
    assert gradients.ok, f"gradients: {gradients.describe()}\n  {where}"

    # Blocks of the whole problem (`Kernel.chunk`), merged by lse, forward and backward.
    lq, lk = max(q_len, 2), max(kv_len, 2)
    qq = torch.randn(batch, heads, lq, 16, generator=g).requires_grad_()
    kk, vv = (torch.randn(batch, kv_heads, lk, 16, generator=g).requires_grad_() for _ in range(2))
    q_cuts = sorted({0, lq, r.randint(1, lq - 1)})
    kv_cuts = sorted({0, lk, *(r.randint(1, lk - 1) for _ in range(r.randint(0, 2)))})
    rows = []
    for q0, q1 in itertools.pairwise(q_cuts):
        parts = [
            kern.chunk(
                qq[:, :, q0:q1],
                kk[:, :, k0:k1],
                vv[:, :, k0:k1],
                q_offset=q0,
                kv_offset=k0,
                q_len=lq,
                kv_len=lk,
                return_lse=True,
            )
            for k0, k1 in itertools.pairwise(kv_cuts)
        ]
        rows.append(merge_splits(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))[0])
    whole = torch.cat(rows, 2)
    upstream = torch.randn(whole.shape, generator=g)
    got = torch.autograd.grad(whole, (qq, kk, vv), upstream)
    leaves = [t.detach().double().requires_grad_() for t in (qq, kk, vv)]
    reference = kern.reference(*leaves)
    want = torch.autograd.grad(reference, leaves, upstream.double())
    torch.testing.assert_close(
        whole.double(), reference, atol=2e-5, rtol=2e-5, msg=lambda m: f"chunks: {m}\n  {where}"
    )
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(
            a.double(), b, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"chunks d{n}: {m}\n  {where}"
        )

    # Decoding against a cache: rows of their own lengths, some empty.
    new = r.randint(1, 6)
    capacity = r.randint(new, 70)
    lengths = torch.tensor([r.choice((0, r.randint(new, capacity))) for _ in range(batch)], dtype=torch.int32)
    qd = torch.randn(batch, heads, new, 16, generator=g)
    kc, vc = (torch.randn(batch, kv_heads, capacity, 16, generator=g) for _ in range(2))
    out, lse = kern.decode(qd, kc, vc, cache_seqlens=lengths, return_lse=True)
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            assert bool((out[b] == 0).all() and lse[b].isneginf().all()), f"decode: empty row {b}\n  {where}"
            continue
        ref = kern.reference(
            qd[b : b + 1].double(),
            kc[b : b + 1, :, :n].double(),
            vc[b : b + 1, :, :n].double(),
            q_offset=n - new,
        )
        torch.testing.assert_close(
            out[b : b + 1].double(), ref, atol=2e-5, rtol=2e-5, msg=lambda m: f"decode: {m}\n  {where}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("campaign", choices=("generic", "conjuncts"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=600.0, help="generic: the time budget")
    parser.add_argument("--programs", type=int, default=50, help="conjuncts: how many programs")
    args = parser.parse_args(argv)
    if args.campaign == "generic":
        from attnc.testing import fuzz

        launch._config = _hashed_config(args.seed)  # type: ignore[assignment]
        report = fuzz.fuzz(
            fuzz.cases(grads=True, max_len=70), seconds=args.seconds, seed=args.seed,
            save=Path("fuzz-failures"), batch=20,
        )  # fmt: skip
        print(report)
        return 1 if report.failure else 0
    launch._config = _chosen_config  # type: ignore[assignment]
    failures = 0
    for index in range(args.programs):
        try:
            _check_conjuncts(random.Random(args.seed * 100_003 + index), index)
        except Exception as error:  # a failure of any kind is reported, and the campaign goes on
            failures += 1
            print(f"FAIL [{index}] {error}" if isinstance(error, AssertionError) else traceback.format_exc())
        sys.stdout.flush()
    print(f"{args.programs} programs, seed {args.seed}: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
