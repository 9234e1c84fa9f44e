"""The pattern library in examples/: every published pattern of the project's list as an `.attn` example.

Each example's mask is held to a definition written here independently, from the paper's wording and
the convention its header states — plain loops over (query, key) pairs, or a simulation of the
mechanism the paper describes (Swin's roll and region mask, STA's tile reordering) — never from the
`.attn` form. Each example's kernel is held to the dense oracle. The cross-checks between patterns
(one document is causal or full, a window as long as the sequence is causal or full, a neighbourhood as
large as the grid is full) compare masks and kernel outputs.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from cases import DEVICE, EXAMPLES, example_script

import attnc
from attnc.runtime.plan import PARTIAL
from attnc.testing import compare

STD = attnc.stdlib()


@functools.cache
def example(stem: str) -> attnc.Module:
    return attnc.load(EXAMPLES / f"{stem}.attn")


Rule = Callable[[int, int, int, int], bool]  # (b, h, q, kv) -> may query q see key kv
Inputs = Callable[[int, int, int, int], dict[str, torch.Tensor]]  # (batch, heads, q_len, kv_len)


def dense(rule: Rule, batch: int, heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """The mask a rule defines, bool [batch, heads, q_len, kv_len], pair by pair."""
    out = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b, h, i, j in itertools.product(range(batch), range(heads), range(q_len), range(kv_len)):
        out[b, h, i, j] = rule(b, h, i, j)
    return out


def expect_mask(actual: torch.Tensor, expected: torch.Tensor) -> None:
    expected = expected.expand(actual.shape)
    bad = (actual != expected).nonzero().tolist()
    assert not bad, f"{len(bad)} mismatches, first (b, h, q, kv) = {bad[:5]}"


def no_inputs(batch: int, heads: int, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    return {}


def qkv(
    batch: int, heads: int, q_len: int, kv_len: int, dim: int = 16, seed: int = 0, device: str = DEVICE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float32 q, k, v on the device the kernels run on (the GPU when there is one)."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, q_len, dim, generator=g).to(device),
        torch.randn(batch, heads, kv_len, dim, generator=g).to(device),
        torch.randn(batch, heads, kv_len, dim, generator=g).to(device),
    )


def on_device(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.to(DEVICE) for name, tensor in inputs.items()}


# ---- inputs --------------------------------------------------------------------------------------------


def document_ids(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(torch.int32)


def documents(batch: int, heads: int, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    """Two different packings, one per batch row (batch <= 2), including a one-token document."""
    packings = [[7, 1, 20, kv_len], [3, 15, 2, kv_len]]
    rows = [document_ids(p)[:kv_len] for p in packings[:batch]]
    doc = torch.stack(rows)
    starts = torch.stack(
        [torch.tensor([int((row == row[i]).nonzero()[0]) for i in range(kv_len)]) for row in rows]
    )
    return {"doc": doc, "doc_start": starts.to(torch.int32)}


def only_doc(inputs: Inputs) -> Inputs:
    return lambda *sizes: {"doc": inputs(*sizes)["doc"]}


def global_tokens(batch: int, heads: int, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"is_global": torch.rand(batch, kv_len, generator=g) < 0.1}


def block_maps(name: str, block: int) -> Inputs:
    def make(batch: int, heads: int, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(2)
        shape = (batch, heads, -(-q_len // block), -(-kv_len // block))
        return {name: torch.rand(shape, generator=g) < 0.3}

    return make


def vertical_slash_marks(batch: int, heads: int, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "is_column": torch.rand(batch, heads, kv_len, generator=g) < 0.1,
        "is_diagonal": torch.rand(batch, heads, q_len, generator=g) < 0.1,
    }


def bigbird_table(block: int) -> Inputs:
    def make(batch: int, heads: int, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
        return {"random_blocks": example_script("bigbird").random_block_table(-(-q_len // block), seed=4)}

    return make


def bias_table(max_distance: int) -> Inputs:
    def make(batch: int, heads: int, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        return {"bias": torch.randn(heads, 2 * max_distance + 1, generator=g)}

    return make


def temperatures(batch: int, heads: int, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    return {"temperature": torch.linspace(0.5, 2.0, heads)}


# ---- independent definitions -----------------------------------------------------------------------------


def natten_window(i: int, extent: int, kernel: int, dilation: int = 1, causal: bool = False) -> set[int]:
    """NATTEN's neighbourhood of coordinate i along one axis, from its documented semantics: the
    query's dilation group is the coordinates congruent to i modulo `dilation`; causal, the window is
    the `kernel` members of the group ending at i; otherwise it is the run of `kernel` consecutive
    members whose start is nearest to kernel // 2 members before i (centred, moved inside at borders)."""
    group = [j for j in range(extent) if j % dilation == i % dilation]
    at = group.index(i)
    if causal:
        return set(group[max(0, at - kernel + 1) : at + 1])
    start = min(range(len(group) - kernel + 1), key=lambda s: abs(s - (at - kernel // 2)))
    return set(group[start : start + kernel])


def natten_grid_rule(
    extents: tuple[int, ...],
    kernels: tuple[int, ...],
    dilations: tuple[int, ...] | None = None,
    causal: tuple[bool, ...] | None = None,
) -> Rule:
    """A neighbourhood over a row-major grid: a key is seen when every axis allows it."""
    dilations = dilations or (1,) * len(extents)
    causal = causal or (False,) * len(extents)
    coords = list(itertools.product(*(range(n) for n in extents)))
    windows = [
        {c: natten_window(c, n, k, d, z) for c in range(n)}
        for n, k, d, z in zip(extents, kernels, dilations, causal, strict=True)
    ]
    return lambda b, h, i, j: all(
        kc in window[qc] for window, qc, kc in zip(windows, coords[i], coords[j], strict=True)
    )


def swin_shifted_rule(height: int, width: int, window: int, shift: int) -> Rule:
    """Swin's SW-MSA as the paper computes it: roll the map by (-shift, -shift), cut it into windows, and
    inside a window let two tokens attend only when they come from the same region of Swin's mask (the
    slices [0, n - window), [n - window, n - shift), [n - shift, n) of the rolled map on each axis)."""
    index = torch.arange(height * width).reshape(height, width)
    rolled = torch.roll(index, shifts=(-shift, -shift), dims=(0, 1))

    def region(c: int, n: int) -> int:
        return 0 if c < n - window else 1 if c < n - shift else 2

    label: dict[int, tuple[int, int, int, int]] = {}  # token -> (window row, window col, region y, region x)
    for y, x in itertools.product(range(height), range(width)):
        label[int(rolled[y, x])] = (y // window, x // window, region(y, height), region(x, width))
    return lambda b, h, i, j: label[i] == label[j]


def sta_rule(tiles: tuple[int, ...], tile: tuple[int, ...], kernels: tuple[int, ...]) -> Rule:
    """Sliding Tile Attention as the paper lays it out: the tokens of a grid of `tiles` tiles, each of
    `tile` tokens, are ordered tile by tile (tiles row-major, tokens row-major inside a tile); a token
    sees the tokens of the tiles in a kernel window (NATTEN's rule on tile coordinates) of its tile."""
    order = []  # sequence position -> grid coordinates of the token
    for tile_coord in itertools.product(*(range(n) for n in tiles)):
        for inner in itertools.product(*(range(n) for n in tile)):
            order.append(tuple(t * size + o for t, size, o in zip(tile_coord, tile, inner, strict=True)))
    tile_of = [tuple(c // size for c, size in zip(coord, tile, strict=True)) for coord in order]
    windows = [{t: natten_window(t, n, k) for t in range(n)} for n, k in zip(tiles, kernels, strict=True)]
    return lambda b, h, i, j: all(
        kt in window[qt] for window, qt, kt in zip(windows, tile_of[i], tile_of[j], strict=True)
    )


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class Case:
    """One example pattern: parameters small enough for the interpreter, lengths, inputs, and the rule
    it must equal (given the inputs, for patterns that read them)."""

    stem: str
    pattern: str
    params: dict[str, Any]
    length: int  # Q_LEN == KV_LEN == length unless kv_length is given
    rule: Callable[[dict[str, torch.Tensor]], Rule]
    inputs: Inputs = no_inputs
    kv_length: int | None = None
    batch: int = 2
    heads: int = 2
    tags: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.stem}.{self.pattern}"

    def kernel(self) -> attnc.Kernel:
        return example(self.stem)[self.pattern](**self.params)

    @property
    def kv_len(self) -> int:
        return self.length if self.kv_length is None else self.kv_length


def static(rule: Rule) -> Callable[[dict[str, torch.Tensor]], Rule]:
    return lambda inputs: rule


def longformer_global_rule(inputs: dict[str, torch.Tensor]) -> Rule:
    g = inputs["is_global"]
    return lambda b, h, i, j: abs(i - j) <= 2 or bool(g[b, i]) or bool(g[b, j])


def bigbird_rule(block: int) -> Callable[[dict[str, torch.Tensor]], Rule]:
    def rule(inputs: dict[str, torch.Tensor]) -> Rule:
        table = inputs["random_blocks"].tolist()

        def allowed(b: int, h: int, i: int, j: int) -> bool:
            qb, kb, last = i // block, j // block, len(table) - 1
            return qb in (0, last) or kb in (0, last) or abs(qb - kb) <= 1 or kb in table[qb]

        return allowed

    return rule


def document_rule(
    doc_rule: Callable[[int, int, int, int], bool],
) -> Callable[[dict[str, torch.Tensor]], Rule]:
    def rule(inputs: dict[str, torch.Tensor]) -> Rule:
        doc = inputs["doc"].tolist()

        def allowed(b: int, h: int, i: int, j: int) -> bool:
            if doc[b][i] != doc[b][j]:
                return False
            start = doc[b].index(doc[b][j])  # the document's first position, found by search
            return doc_rule(i, j, start, len(doc[b]))

        return allowed

    return rule


def block_map_rule(name: str, block: int, causal: bool) -> Callable[[dict[str, torch.Tensor]], Rule]:
    def rule(inputs: dict[str, torch.Tensor]) -> Rule:
        selected = inputs[name]
        if causal:  # MoBA: the own block causally, selected blocks (causally) too
            return lambda b, h, i, j: (
                j <= i and (i // block == j // block or bool(selected[b, h, i // block, j // block]))
            )
        return lambda b, h, i, j: bool(selected[b, h, i // block, j // block])

    return rule


def vertical_slash_rule(inputs: dict[str, torch.Tensor]) -> Rule:
    column, diagonal = inputs["is_column"], inputs["is_diagonal"]
    return lambda b, h, i, j: j <= i and (bool(column[b, h, j]) or bool(diagonal[b, h, i - j]))


def sparse_strided_rule(stride: int) -> Rule:
    # Child et al.: A1 = {max(0, i - l), ..., i}, A2 = {j : (i - j) mod l = 0}, causal.
    return lambda b, h, i, j: j <= i and (max(0, i - stride) <= j or (i - j) % stride == 0)


def sparse_fixed_rule(block: int, summary: int) -> Rule:
    # Child et al.: A1 = {j : floor(j / l) = floor(i / l)}, A2 = {j : j mod l in {l - c, ..., l - 1}}, causal.
    return lambda b, h, i, j: (
        j <= i and (j // block == i // block or j % block in range(block - summary, block))
    )


CASES = [
    Case("basics", "bidirectional", {}, 13, static(lambda b, h, i, j: True), kv_length=19),
    Case("basics", "gpt_causal", {}, 19, static(lambda b, h, i, j: j <= i), kv_length=13),
    # bottom-right: the last query sees every key; query i stands at key position i + (19 - 13)
    Case("basics", "decode_causal", {}, 13, static(lambda b, h, i, j: j <= i + 6), kv_length=19),
    Case("basics", "t5_prefix_lm", {"prefix": 5}, 20, static(lambda b, h, i, j: j < 5 or j <= i)),
    Case("local_windows", "mistral_window", {"window": 4}, 20, static(lambda b, h, i, j: i - 3 <= j <= i)),
    Case(
        "local_windows",
        "flash_local",
        {"left": 3, "right": 2},
        20,
        static(lambda b, h, i, j: -3 <= j - i <= 2),
    ),
    Case(
        "local_windows",
        "flash_local_bottom_right",
        {"left": 3, "right": 2},
        9,
        static(lambda b, h, i, j: -3 <= j - (i + 20 - 9) <= 2),
        kv_length=20,
    ),
    Case(
        "local_windows",
        "a_shape",
        {"sinks": 2, "window": 4},
        24,
        static(lambda b, h, i, j: j <= i and (j in (0, 1) or j in range(i - 3, i + 1))),
    ),
    Case(
        "streaming_llm",
        "streaming_llm",
        {"window": 5, "sinks": 3},
        24,
        static(lambda b, h, i, j: j <= i and (j < 3 or i - j < 5)),
    ),
    Case(
        "gemma_local",
        "gemma_local",
        {"window": 7, "cap": 2.0},
        24,
        static(lambda b, h, i, j: i - 6 <= j <= i),
    ),
    Case("longformer", "longformer_local", {"w": 3}, 20, static(lambda b, h, i, j: j in range(i - 3, i + 4))),
    Case(
        "longformer",
        "longformer_dilated",
        {"w": 2, "dilation": 3},
        24,
        static(lambda b, h, i, j: j in {i + step * 3 for step in range(-2, 3)}),
    ),
    Case("longformer", "longformer_global", {"w": 2}, 30, longformer_global_rule, global_tokens),
    Case("sparse_transformer", "sparse_strided", {"l": 4}, 24, static(sparse_strided_rule(4))),
    Case("sparse_transformer", "sparse_fixed", {"l": 5, "c": 2}, 24, static(sparse_fixed_rule(5, 2))),
    Case("bigbird", "bigbird", {"block": 4}, 40, bigbird_rule(4), bigbird_table(4)),
    Case(
        "dynamic_sparse",
        "block_sparse",
        {"block": 4},
        30,
        block_map_rule("blocks", 4, False),
        block_maps("blocks", 4),
    ),
    Case(
        "dynamic_sparse",
        "moba",
        {"block": 4},
        30,
        block_map_rule("selected", 4, True),
        block_maps("selected", 4),
    ),
    Case("dynamic_sparse", "vertical_slash", {}, 30, vertical_slash_rule, vertical_slash_marks),
    Case(
        "document_causal",
        "document_causal",
        {},
        30,
        document_rule(lambda i, j, start, n: j <= i),
        only_doc(documents),
    ),
    Case(
        "documents", "document_full", {}, 30, document_rule(lambda i, j, start, n: True), only_doc(documents)
    ),
    Case(
        "documents",
        "document_prefix_lm",
        {"prefix": 3},
        30,
        document_rule(lambda i, j, start, n: j - start < 3 or j <= i),
        documents,
    ),
    Case(
        "natten",
        "na_1d",
        {"kernel": 3, "dilation": 2, "is_causal": True},
        20,
        static(natten_grid_rule((20,), (3,), (2,), (True,))),
    ),
    Case(
        "natten",
        "nat_2d",
        {"height": 5, "width": 6, "kernel": 3},
        30,
        static(natten_grid_rule((5, 6), (3, 3))),
    ),
    Case(
        "natten",
        "dinat_2d",
        {"height": 7, "width": 6, "kernel": 3, "dilation": 2},
        42,
        static(natten_grid_rule((7, 6), (3, 3), (2, 2))),
    ),
    Case(
        "natten",
        "na_3d_video",
        {"frames": 3, "height": 4, "width": 5, "kernel_t": 2, "kernel": 3},
        60,
        static(natten_grid_rule((3, 4, 5), (2, 3, 3), (1, 1, 1), (True, False, False))),
    ),
    Case(
        "swin",
        "swin_window",
        {"height": 6, "width": 9, "window": 3},
        54,
        static(lambda b, h, i, j: (i // 9 // 3, i % 9 // 3) == (j // 9 // 3, j % 9 // 3)),
    ),
    Case(
        "swin",
        "swin_shifted",
        {"height": 6, "width": 9, "window": 3, "shift": 1},
        54,
        static(swin_shifted_rule(6, 9, 3, 1)),
    ),
    Case(
        "sliding_tile",
        "sta_2d",
        {"tiles_h": 4, "tiles_w": 3, "tile_h": 2, "tile_w": 3, "kernel_h": 3, "kernel_w": 1},
        72,
        static(sta_rule((4, 3), (2, 3), (3, 1))),
    ),
    Case(
        "sliding_tile",
        "sta_3d",
        dict(
            tiles_t=3, tiles_h=2, tiles_w=3, tile_t=1, tile_h=2, tile_w=2, kernel_t=3, kernel_h=1, kernel_w=3
        ),
        72,
        static(sta_rule((3, 2, 3), (1, 2, 2), (3, 1, 3))),
    ),
    Case(
        "power_attention",
        "power_attention",
        {"block": 2, "window_blocks": 2},
        40,
        static(
            lambda b, h, i, j: (
                j <= i and (i // 2 - j // 2 < 2 or power_of_two(i // 2 - j // 2) or j // 2 == 0)
            )
        ),
    ),
    Case("alibi", "alibi", {}, 20, static(lambda b, h, i, j: j <= i)),
    Case(
        "score_mods", "relative_bias", {"max_distance": 4}, 20, static(lambda b, h, i, j: True), bias_table(4)
    ),
    Case("score_mods", "head_temperature", {}, 20, static(lambda b, h, i, j: True), temperatures),
]


def case_id(case: Case) -> str:
    return case.id


# ---- the library is complete and documented ------------------------------------------------------------

# Every pattern of the project's list of published patterns (PATTERNS.md, by its row number) -> its example.
PUBLISHED = {
    1: ("basics", "bidirectional"),
    2: ("basics", "gpt_causal"),
    3: ("basics", "decode_causal"),
    4: ("local_windows", "mistral_window"),
    5: ("longformer", "longformer_local"),
    6: ("local_windows", "flash_local"),
    7: ("longformer", "longformer_dilated"),
    8: ("streaming_llm", "streaming_llm"),
    9: ("local_windows", "a_shape"),
    10: ("basics", "t5_prefix_lm"),
    11: ("documents", "document_full"),
    12: ("document_causal", "document_causal"),
    13: ("documents", "document_prefix_lm"),
    14: ("longformer", "longformer_global"),
    15: ("sparse_transformer", "sparse_strided"),
    16: ("sparse_transformer", "sparse_fixed"),
    17: ("bigbird", "bigbird"),
    18: ("dynamic_sparse", "block_sparse"),
    19: ("dynamic_sparse", "vertical_slash"),
    20: ("natten", "na_3d_video"),
    21: ("swin", "swin_window"),
    22: ("power_attention", "power_attention"),
    23: ("sliding_tile", "sta_3d"),
    24: ("alibi", "alibi"),
    25: ("gemma_local", "gemma_local"),
    26: ("score_mods", "relative_bias"),
    27: ("score_mods", "head_temperature"),
}


def every_example_pattern() -> set[tuple[str, str]]:
    return {(path.stem, name) for path in EXAMPLES.glob("*.attn") for name in attnc.load(path).own_patterns}


def test_every_published_pattern_is_an_example() -> None:
    assert sorted(PUBLISHED) == list(range(1, 28))
    assert set(PUBLISHED.values()) <= every_example_pattern()


def test_every_example_pattern_has_a_case_here() -> None:
    assert {(c.stem, c.pattern) for c in CASES} == every_example_pattern()


def comment_above(lines: list[str], at: int) -> str:
    """The nearest block of consecutive comment lines above line `at`."""
    while at > 0 and not lines[at - 1].startswith("#"):
        at -= 1
    end = at
    while at > 0 and lines[at - 1].startswith("#"):
        at -= 1
    return "\n".join(lines[at:end])


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.attn")), ids=lambda p: p.name)
def test_every_example_cites_its_source_and_states_its_convention(path: Path) -> None:
    lines = path.read_text().splitlines()
    header = comment_above(lines, lines.index("") if "" in lines else len(lines))
    assert lines[0].startswith("#") and header, "an example starts with a header comment"
    patterns = [i for i, line in enumerate(lines) if line.startswith("pattern ")]
    assert patterns
    for at in patterns:
        comment = comment_above(lines, at)
        assert re.search(r"\b(19|20)\d\d\b", header + comment), f"{lines[at]}: no cited year"
        assert "Convention" in header + comment, f"{lines[at]}: no stated convention"


# ---- masks equal their independent definitions ------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_example_mask_matches_its_definition(case: Case) -> None:
    inputs = case.inputs(case.batch, case.heads, case.length, case.kv_len)
    actual = case.kernel().mask(case.length, case.kv_len, batch=case.batch, num_heads=case.heads, **inputs)
    expect_mask(actual, dense(case.rule(inputs), case.batch, case.heads, case.length, case.kv_len))


# ---- kernels equal the oracle ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_example_kernel_matches_the_oracle(case: Case) -> None:
    inputs = case.inputs(case.batch, case.heads, case.length, case.kv_len)
    inputs = on_device(inputs)
    q, k, v = qkv(case.batch, case.heads, case.length, case.kv_len)
    kern = case.kernel()
    out, lse = kern(q, k, v, return_lse=True, **inputs)
    comparison = compare(kern, out, lse, q, k, v, **inputs)
    assert comparison.ok, f"{case.id}: {comparison.describe()}"


# ---- NATTEN's semantics, over more grids than the examples' defaults ------------------------------------


def test_natten_window_definition_on_known_windows() -> None:
    # Centred, moved inside at the borders, always `kernel` coordinates.
    assert [sorted(natten_window(i, 7, 3)) for i in (0, 1, 3, 6)] == [
        [0, 1, 2],
        [0, 1, 2],
        [2, 3, 4],
        [4, 5, 6],
    ]
    # Dilation 2 over 7 coordinates: groups {0, 2, 4, 6} and {1, 3, 5}.
    assert sorted(natten_window(6, 7, 3, dilation=2)) == [2, 4, 6]
    assert sorted(natten_window(3, 7, 3, dilation=2)) == [1, 3, 5]
    # Causal: the group's `kernel` coordinates ending at i, fewer near the start.
    assert sorted(natten_window(5, 7, 3, dilation=2, causal=True)) == [1, 3, 5]
    assert sorted(natten_window(1, 7, 3, causal=True)) == [0, 1]


# (extents, kernels, dilations, causal per axis): non-square extents, borders, dilation groups of unequal
# size, causal on some axes.
NATTEN_2D = [
    ((5, 7), (3, 5), (1, 1), (False, False)),
    ((7, 5), (3, 3), (2, 1), (False, False)),
    ((8, 9), (3, 3), (2, 3), (False, False)),
    ((6, 6), (5, 3), (1, 2), (True, False)),
    ((5, 8), (3, 3), (1, 2), (False, True)),
    ((7, 6), (3, 3), (2, 2), (True, True)),
]
NATTEN_3D = [
    ((3, 4, 5), (3, 3, 3), (1, 1, 1), (False, False, False)),
    ((4, 3, 6), (3, 3, 3), (1, 1, 2), (True, False, False)),
    ((5, 4, 3), (1, 3, 3), (2, 1, 1), (False, True, True)),
    ((4, 6, 4), (2, 3, 1), (2, 2, 3), (True, False, True)),
]


@pytest.mark.parametrize(("extents", "kernels", "dilations", "causal"), NATTEN_2D, ids=str)
def test_neighborhood_2d_is_natten(
    extents: tuple[int, int], kernels: tuple[int, int], dilations: tuple[int, int], causal: tuple[bool, bool]
) -> None:
    (height, width), (kh, kw), (dh, dw), (ch, cw) = extents, kernels, dilations, causal
    kern = STD.neighborhood_2d(height, width, kh, kw, dh, dw, ch, cw)
    n = height * width
    expect_mask(kern.mask(n, n), dense(natten_grid_rule(extents, kernels, dilations, causal), 1, 1, n, n))


@pytest.mark.parametrize(("extents", "kernels", "dilations", "causal"), NATTEN_3D, ids=str)
def test_neighborhood_3d_is_natten(
    extents: tuple[int, int, int],
    kernels: tuple[int, int, int],
    dilations: tuple[int, int, int],
    causal: tuple[bool, bool, bool],
) -> None:
    kern = STD.neighborhood_3d(*extents, *kernels, *dilations, *causal)
    n = extents[0] * extents[1] * extents[2]
    expect_mask(kern.mask(n, n), dense(natten_grid_rule(extents, kernels, dilations, causal), 1, 1, n, n))


def test_dilated_causal_2d_neighbourhood_kernel_matches_the_oracle() -> None:
    kern = STD.neighborhood_2d(7, 6, 3, 3, 2, 2, True, False)
    q, k, v = qkv(1, 2, 42, 42)
    out, lse = kern(q, k, v, return_lse=True)
    assert compare(kern, out, lse, q, k, v).ok


# ---- Swin, STA, BigBird, PowerAttention: structure the headers promise ----------------------------------


@pytest.mark.parametrize(("height", "width", "window", "shift"), [(8, 4, 4, 2), (6, 6, 3, 1), (4, 8, 2, 1)])
def test_swin_shifted_windows_are_the_rolled_and_masked_windows(
    height: int, width: int, window: int, shift: int
) -> None:
    kern = example("swin").swin_shifted(height=height, width=width, window=window, shift=shift)
    n = height * width
    expect_mask(kern.mask(n, n), dense(swin_shifted_rule(height, width, window, shift), 1, 1, n, n))


def test_swin_with_shift_zero_is_the_plain_window_partition() -> None:
    swin = example("swin")
    plain = swin.swin_window(height=6, width=9, window=3).mask(54, 54)
    expect_mask(swin.swin_shifted(height=6, width=9, window=3, shift=0).mask(54, 54), plain)


@pytest.mark.parametrize(
    ("kern", "length", "block"),
    [
        (example("sliding_tile").sta_2d(tiles_h=4, tiles_w=5, tile_h=2, tile_w=4), 160, 8),
        (
            example("sliding_tile").sta_3d(tiles_t=3, tiles_h=3, tiles_w=4, tile_t=2, tile_h=2, tile_w=4),
            576,
            16,
        ),
        (
            example("sliding_tile").sta_3d(tiles_t=3, tiles_h=3, tiles_w=4, tile_t=2, tile_h=2, tile_w=4),
            576,
            8,
        ),
    ],
    ids=["sta_2d", "sta_3d", "sta_3d-half-tiles"],
)
def test_sliding_tile_attention_has_no_partial_tile_when_blocks_divide_its_tiles(
    kern: attnc.Kernel, length: int, block: int
) -> None:
    classes = kern.block_map(length, length, block=(block, block))
    assert (classes != PARTIAL).all() and (classes != 0).any()


def test_bigbird_has_no_partial_tile_at_its_block_size() -> None:
    kern = example("bigbird").bigbird(block=8)
    table = example_script("bigbird").random_block_table(12, seed=0)
    classes = kern.block_map(96, 96, block=(8, 8), random_blocks=table)
    assert (classes != PARTIAL).all()


def test_bigbird_random_table_draws_outside_window_and_global_blocks() -> None:
    table = example_script("bigbird").random_block_table(10, seed=7)
    assert table.shape == (10, 3) and table.dtype == torch.int32
    assert (table[0] == -1).all() and (table[-1] == -1).all()
    for qb in range(1, 9):
        drawn = table[qb].tolist()
        assert len(set(drawn)) == 3 and all(1 <= kb <= 8 and abs(kb - qb) > 1 for kb in drawn)
    assert torch.equal(table, example_script("bigbird").random_block_table(10, seed=7))
    assert not torch.equal(table, example_script("bigbird").random_block_table(10, seed=8))


def test_power_attention_launch_plan_is_exact_on_block_aligned_tiles() -> None:
    kern = example("power_attention").power_attention(block=16, window_blocks=2)
    exact = kern.block_map(2048, 2048, block=(16, 16))
    assert torch.equal(kern.plan(2048, 2048, block=(16, 16)).block_map(), exact)
    assert (exact[0, 0, 100, :].nonzero().flatten().tolist()) == [0, 36, 68, 84, 92, 96, 98, 99, 100]


# ---- score functions: the papers' formulas ------------------------------------------------------------


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    bias: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Softmax attention in float64 with `bias(scores)` as the modified scores and a bool mask."""
    scores = bias(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5)
    return torch.softmax(scores.masked_fill(~mask, -torch.inf), dim=-1) @ v.double()


def distance(length: int) -> torch.Tensor:
    return torch.arange(length)[:, None] - torch.arange(length)[None, :]  # q - kv


def test_alibi_slopes_are_the_papers_geometric_sequence() -> None:
    q, k, v = qkv(1, 8, 12, 12, seed=1, device="cpu")
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(8)], dtype=torch.float64)  # 1/2 ... 1/256
    causal = distance(12) >= 0
    expected = dense_attention(q, k, v, causal, lambda s: s - slopes[:, None, None] * distance(12))
    actual = example("alibi").alibi().reference(q, k, v, out_dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_relative_bias_reads_the_clamped_distance() -> None:
    q, k, v = qkv(1, 2, 12, 12, seed=2, device="cpu")
    bias = torch.randn(2, 9)
    index = distance(12).clamp(-4, 4) + 4
    expected = dense_attention(
        q, k, v, torch.ones(12, 12, dtype=torch.bool), lambda s: s + bias.double()[:, index]
    )
    actual = (
        example("score_mods")
        .relative_bias(max_distance=4)
        .reference(q, k, v, bias=bias, out_dtype=torch.float64)
    )
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_head_temperature_scales_each_heads_scores() -> None:
    q, k, v = qkv(1, 3, 10, 10, seed=3, device="cpu")
    temperature = torch.tensor([0.5, 1.0, 3.0])
    everything = torch.ones(10, 10, dtype=torch.bool)
    expected = dense_attention(q, k, v, everything, lambda s: s * temperature.double()[:, None, None])
    actual = (
        example("score_mods")
        .head_temperature()
        .reference(q, k, v, temperature=temperature, out_dtype=torch.float64)
    )
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_score_table_inputs_get_gradients_through_the_kernel() -> None:
    kern = example("score_mods").relative_bias(max_distance=4)
    q, k, v = qkv(1, 2, 20, 20, seed=4)
    bias = torch.zeros(2, 9, device=DEVICE, requires_grad=True)
    kern(q, k, v, bias=bias).sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


# ---- conventions the headers state ----------------------------------------------------------------------


def test_flash_attention_left_window_is_a_sliding_window_one_longer() -> None:
    windows = example("local_windows")
    for left in (0, 1, 4):
        expect_mask(
            windows.flash_local(left=left, right=0).mask(20, 20),
            windows.mistral_window(window=left + 1).mask(20, 20),
        )


def test_flash_local_bottom_right_equals_top_left_when_lengths_match() -> None:
    windows = example("local_windows")
    expect_mask(windows.flash_local_bottom_right(3, 2).mask(20, 20), windows.flash_local(3, 2).mask(20, 20))


def test_longformer_w_is_the_reach_on_each_side() -> None:
    counts = example("longformer").longformer_local(w=3).mask(20, 20)[0, 0].sum(dim=1)
    assert counts[3:-3].tolist() == [7] * 14  # 2 * w + 1 away from the borders


# ---- PATTERNS.md cross-checks: masks and kernel outputs ---------------------------------------------------


@dataclass(frozen=True)
class Same:
    """Two patterns that must agree at these lengths (inputs for the first only)."""

    name: str
    first: attnc.Kernel
    second: attnc.Kernel
    length: int
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def one_document(length: int, with_start: bool = False) -> dict[str, torch.Tensor]:
    zeros = torch.zeros(2, length, dtype=torch.int32)
    return {"doc": zeros, "doc_start": zeros} if with_start else {"doc": zeros}


def same_cases() -> list[Same]:
    basics, windows, longformer, natten = (
        example("basics"),
        example("local_windows"),
        example("longformer"),
        example("natten"),
    )
    causal, full = basics.gpt_causal(), basics.bidirectional()
    return [
        Same(
            "one document, causal", example("document_causal").document_causal(), causal, 30, one_document(30)
        ),
        Same("one document, full", example("documents").document_full(), full, 30, one_document(30)),
        Same(
            "one document, prefix LM",
            example("documents").document_prefix_lm(prefix=6),
            basics.t5_prefix_lm(prefix=6),
            30,
            one_document(30, with_start=True),
        ),
        Same("window = length, causal", windows.mistral_window(window=30), causal, 30),
        Same("window > length, causal", windows.mistral_window(window=100), causal, 30),
        Same(
            "window > length, sinks", example("streaming_llm").streaming_llm(window=40, sinks=4), causal, 30
        ),
        Same("window > length, A-shape", windows.a_shape(sinks=4, window=30), causal, 30),
        Same("window > length, strided", example("sparse_transformer").sparse_strided(l=30), causal, 30),
        Same("window = length, local", longformer.longformer_local(w=29), full, 30),
        Same("window > length, FlashAttention", windows.flash_local(left=40, right=40), full, 30),
        Same("window > length, FlashAttention left", windows.flash_local(left=40, right=0), causal, 30),
        Same("kernel = extent, 1-D", natten.na_1d(kernel=30), full, 30),
        Same("kernel = extent, 2-D", natten.nat_2d(height=5, width=5, kernel=5), full, 25),
        Same("kernel = extent, 3-D", STD.neighborhood_3d(2, 3, 5, 2, 3, 5), full, 30),
        Same("kernel = extent, causal 1-D", natten.na_1d(kernel=30, is_causal=True), causal, 30),
        Same("tile kernel = tile grid, STA", example("sliding_tile").sta_2d(3, 2, 2, 3, 3, 2), full, 36),
        Same("window = grid, Swin", example("swin").swin_window(height=6, width=6, window=6), full, 36),
    ]


SAME = same_cases()


@pytest.mark.parametrize("same", SAME, ids=lambda s: s.name)
def test_cross_check_masks_are_equal(same: Same) -> None:
    n = same.length
    expect_mask(
        same.first.mask(n, n, batch=2, num_heads=2, **same.inputs),
        same.second.mask(n, n, batch=2, num_heads=2),
    )


@pytest.mark.parametrize("same", SAME, ids=lambda s: s.name)
def test_cross_check_kernel_outputs_are_equal(same: Same) -> None:
    q, k, v = qkv(2, 2, same.length, same.length, seed=5)
    out, lse = same.first(q, k, v, return_lse=True, **on_device(same.inputs))
    expected, expected_lse = same.second(q, k, v, return_lse=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-6)
