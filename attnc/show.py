"""`attnc show`: one (batch row, head) of a kernel's tile map — which tiles a launch skips (EMPTY), runs
with the mask (PARTIAL) or runs unmasked (FULL) — as text, and with matplotlib as a PNG beside the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from attnc.api import Kernel, _dim_value
from attnc.ir.results import Sparsity
from attnc.runtime.plan import EMPTY, FULL, PARTIAL

CHARS = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
NAMES = {EMPTY: "EMPTY", PARTIAL: "PARTIAL", FULL: "FULL"}
# The text map fits in this many characters each way; the PNG's tile panel in this many pixels.
TEXT_LIMIT = 64
IMAGE_LIMIT = 1024
# The PNG's mask panel is drawn only when the dense mask has at most this many elements (it is O(N^2)).
MASK_LIMIT = 4_000_000
# The most tiles (over the batch rows and heads up to the one shown) a tile map is computed for: 2**26 is
# a 1M x 1M map in tiles of 128 (seconds, and a few GB at most); past it a ShowError, not the allocator.
TILE_LIMIT = 2**26
# The largest tile side: the exact map evaluates the mask on every position of a PARTIAL tile, BM x BN
# at once, so a tile of 4096 x 4096 (16M positions) is the most that stays cheap.
BLOCK_LIMIT = 4096
# Colours of EMPTY, PARTIAL and FULL in the PNG (allowed and masked pairs reuse FULL and EMPTY).
COLOURS = ("#f2f2f2", "#f5a623", "#1f4e9c")


class ShowError(ValueError):
    """A bad argument to `attnc show` (not an error in the `.attn` program): reported without a
    traceback."""


@dataclass(frozen=True)
class TileView:
    """What `attnc show` shows: the exact tile classes of one (batch row, head) and the launch plan.

    classes:  int8 [query tiles, key tiles], 0 EMPTY / 1 PARTIAL / 2 FULL (`Kernel.block_map`).
    planned:  the same tiles as the launch plan classes them (may call an EMPTY or FULL tile PARTIAL).
    metadata: the plan's metadata tensors, by name (empty for analytic patterns).
    inputs:   the input tensors the maps were computed for (random ones for `--random-inputs`).
    seed:     the seed of random inputs; None when the inputs were given (or there are none).
    """

    kernel: Kernel
    q_len: int
    kv_len: int
    block: tuple[int, int]
    batch: int
    head: int
    classes: torch.Tensor
    planned: torch.Tensor
    sparsity: Sparsity
    metadata: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    seed: int | None

    def counts(self) -> dict[int, int]:
        """How many tiles of the map are EMPTY, PARTIAL and FULL."""
        return {c: int((self.classes == c).sum()) for c in (EMPTY, PARTIAL, FULL)}


def tile_view(
    kernel: Kernel,
    q_len: int,
    kv_len: int,
    *,
    block: tuple[int, int] = (128, 128),
    batch: int = 0,
    head: int = 0,
    seed: int | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
) -> TileView:
    """The tile map of batch row `batch` and head `head`. The pattern sees BATCH = batch + 1 and NUM_HEADS
    = head + 1. A pattern with inputs needs `seed` — its inputs are then `random_inputs` of that seed —
    or the `inputs` themselves, shaped for those sizes (as `Kernel.block_map` takes them)."""
    for what, value, least in (
        ("q_len", q_len, 1),
        ("kv_len", kv_len, 1),
        ("batch", batch, 0),
        ("head", head, 0),
    ):
        if value < least:
            raise ShowError(f"{what} must be at least {least}, got {value}")
    if len(block) != 2 or min(block) < 1:
        raise ShowError(f"block must be two positive ints BM,BN, got {','.join(map(str, block))}")
    if max(block) > BLOCK_LIMIT:
        raise ShowError(f"block sides are at most {BLOCK_LIMIT} here, got {','.join(map(str, block))}")
    rows, cols = -(-q_len // block[0]), -(-kv_len // block[1])
    tiles = (batch + 1) * (head + 1) * rows * cols
    if tiles > TILE_LIMIT:
        raise ShowError(
            f"the tile map would have {tiles:,} tiles ({batch + 1} batch rows x {head + 1} heads x {rows:,} "
            f"x {cols:,}), more than attnc show's {TILE_LIMIT:,}: use shorter lengths, a larger block, or "
            "a smaller batch row or head"
        )
    sizes = {"BATCH": batch + 1, "NUM_HEADS": head + 1, "Q_LEN": q_len, "KV_LEN": kv_len}
    if seed is not None and inputs is not None:
        raise ShowError("give either random inputs (a seed) or the inputs, not both")
    if kernel.inputs and seed is None and inputs is None:
        names = ", ".join(kernel.inputs)
        raise ShowError(
            f"pattern '{kernel.name}' needs input tensors ({names}); "
            "pass --random-inputs SEED to show it on random ones"
        )
    if seed is not None:
        inputs = random_inputs(kernel, sizes, seed)
    inputs = inputs or {}
    shape = {"block": block, "batch": batch + 1, "num_heads": head + 1}
    classes = kernel.block_map(q_len, kv_len, **shape, **inputs)[batch, head]
    plan = kernel.plan(q_len, kv_len, **shape, **inputs)
    planned = plan.block_map()
    # The plan has size-1 batch / head axes where the pattern does not depend on b / h.
    planned = planned[min(batch, planned.shape[0] - 1), min(head, planned.shape[1] - 1)]
    sparsity = kernel.pattern.sparsity
    assert sparsity is not None, "a kernel is compiled through block-sparsify"
    return TileView(
        kernel=kernel,
        q_len=q_len,
        kv_len=kv_len,
        block=block,
        batch=batch,
        head=head,
        classes=classes,
        planned=planned,
        sparsity=sparsity,
        metadata=plan.tensors(),
        inputs=inputs,
        seed=seed,
    )


def random_inputs(kernel: Kernel, sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """A random tensor for each of the kernel's inputs, shaped by its declared dims at these sizes: int
    inputs hold sorted document ids along their last axis (segments of geometric length, mean about an
    eighth of the axis), bool inputs are true with probability 1/2, float inputs standard normal."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for decl in kernel.pattern.inputs:
        shape = [_dim_value(dim, sizes) for dim in decl.dims]
        if any(n is None or n < 0 for n in shape):
            raise ShowError(f"input '{decl.name}' has no valid shape at these sizes: {shape}")
        dtype = getattr(torch, decl.dtype)
        if dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator).to(dtype)
        elif dtype == torch.bool:
            tensor = torch.rand(shape, generator=generator) < 0.5
        else:
            # A new document starts at each position with probability 1 / mean; the first one is 0.
            mean = max(shape[-1] / 8, 1.0)
            starts = torch.rand(shape, generator=generator) < 1 / mean
            starts[..., :1] = False
            tensor = starts.cumsum(dim=-1).to(dtype)
        tensors[decl.name] = tensor
    return tensors


def group_tiles(classes: torch.Tensor, limit: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """`classes` [rows, cols] shrunk to at most `limit` each way by grouping A x B tiles (the smallest A
    and B that fit): a group is EMPTY if all its tiles are, FULL if all are, else PARTIAL. Returns the
    groups and (A, B)."""
    rows, cols = classes.shape
    a, b = max(1, -(-rows // limit)), max(1, -(-cols // limit))
    if (a, b) == (1, 1):
        return classes, (1, 1)
    n_rows, n_cols = -(-rows // a), -(-cols // b)
    pad = (0, n_cols * b - cols, 0, n_rows * a - rows)
    inside = torch.nn.functional.pad(torch.ones_like(classes, dtype=torch.bool), pad, value=False)
    padded = torch.nn.functional.pad(classes, pad, value=EMPTY)

    def by_group(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(n_rows, a, n_cols, b).transpose(1, 2).flatten(2)

    inside = by_group(inside)
    anywhere = (by_group(padded) != EMPTY).any(-1)
    everywhere = ((by_group(padded) == FULL) | ~inside).all(-1)
    grouped = torch.where(everywhere, FULL, torch.where(anywhere, PARTIAL, EMPTY)).to(torch.int8)
    return grouped, (a, b)


def title(view: TileView, separator: str = ", ") -> str:
    """The header: pattern and parameters, lengths and block; then the sparsity and what a launch needs."""
    kernel = view.kernel
    params = ", ".join(f"{k}={v!r}" for k, v in kernel.params.items())
    name = f"{kernel.name}({params})" if params else kernel.name
    if view.metadata:
        size = sum(t.numel() * t.element_size() for t in view.metadata.values())
        needs = f"{len(view.metadata)} metadata tensors, {_bytes(size)}"
    else:
        needs = "no metadata"
    bm, bn = view.block
    return (
        f"{name}: q_len {view.q_len} x kv_len {view.kv_len}, block {bm}x{bn}{separator}"
        f"sparsity {view.sparsity} ({needs})"
    )


def render(view: TileView) -> str:
    """The terminal picture: header, inputs, the map (rows are query tiles, columns key tiles), legend,
    tile counts, density, and how the launch plan differs from the exact map."""
    lines = [title(view)]
    if view.inputs:
        shown = ", ".join(f"{n} {str(t.dtype)[6:]}{list(t.shape)}" for n, t in view.inputs.items())
        origin = "given" if view.seed is None else f"random (seed {view.seed})"
        lines.append(f"inputs: {shown}, {origin}")
    rows, cols = view.classes.shape
    grouped, (a, b) = group_tiles(view.classes, TEXT_LIMIT)
    heading = f"tile map of batch row {view.batch}, head {view.head}: {rows} x {cols} tiles"
    if (a, b) != (1, 1):
        heading += f"; each character is {a}x{b} tiles (EMPTY if all are, FULL if all are, else PARTIAL)"
    lines.append(heading + ", rows are query tiles, columns key tiles")
    lines.append("legend: " + "  ".join(f"'{CHARS[c]}' {NAMES[c]}" for c in (EMPTY, PARTIAL, FULL)))
    lines += ["  " + "".join(CHARS[c] for c in row) for row in grouped.tolist()]
    counts = view.counts()
    total = rows * cols
    lines.append(
        f"tiles: {counts[EMPTY]} EMPTY, {counts[PARTIAL]} PARTIAL, {counts[FULL]} FULL ({total} in all)"
    )
    visited = counts[PARTIAL] + counts[FULL]
    lines.append(
        f"density: {_percent(visited, total)} of tiles visited (PARTIAL or FULL), "
        f"{_percent(counts[FULL], total)} FULL"
    )
    loose = int((view.planned != view.classes).sum())
    lines.append(
        "launch plan: the same classes"
        if loose == 0
        else f"launch plan: {loose} of these tiles PARTIAL (it cannot prove them EMPTY or FULL)"
    )
    return "\n".join(lines) + "\n"


def save_png(view: TileView, path: str | Path) -> None:
    """A PNG of the tile map (left) and, when it has at most `MASK_LIMIT` elements, the dense mask of
    the same batch row and head (right). Needs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
    except ImportError:
        raise ShowError("attnc show --png needs matplotlib (pip install matplotlib)") from None
    batches, heads = view.batch + 1, view.head + 1
    with_mask = view.q_len * view.kv_len * batches * heads <= MASK_LIMIT
    figure = Figure(figsize=(12 if with_mask else 6.5, 5.5), layout="constrained")
    FigureCanvasAgg(figure)  # an Agg canvas of its own: no display, and the global backend untouched
    figure.suptitle(title(view, separator="\n"), fontsize=9)
    axes = figure.subplots(1, 2 if with_mask else 1, squeeze=False)[0]

    grouped, (a, b) = group_tiles(view.classes, IMAGE_LIMIT)
    rows, cols = view.classes.shape
    bm, bn = view.block
    image = axes[0].imshow(
        grouped.numpy(),
        cmap=ListedColormap(COLOURS),
        vmin=-0.5,
        vmax=2.5,
        interpolation="nearest",
        extent=(0, cols * bn, rows * bm, 0),
        aspect=_aspect(rows * bm, cols * bn),
    )
    counts = view.counts()
    grouping = f", {a}x{b} tiles a pixel" if (a, b) != (1, 1) else ""
    axes[0].set_title(
        f"tiles {bm}x{bn} (batch row {view.batch}, head {view.head}{grouping})\n"
        f"{counts[EMPTY]} EMPTY, {counts[PARTIAL]} PARTIAL, {counts[FULL]} FULL",
        fontsize=9,
    )
    axes[0].set_xlabel("key position")
    axes[0].set_ylabel("query position")
    colorbar = figure.colorbar(image, ax=axes[0], ticks=[EMPTY, PARTIAL, FULL], shrink=0.6)
    colorbar.ax.set_yticklabels([NAMES[c] for c in (EMPTY, PARTIAL, FULL)])

    if with_mask:
        mask = view.kernel.mask(view.q_len, view.kv_len, batch=batches, num_heads=heads, **view.inputs)
        mask = mask[view.batch, view.head]
        allowed = int(mask.sum())
        axes[1].imshow(
            mask.numpy(),
            cmap=ListedColormap([COLOURS[EMPTY], COLOURS[FULL]]),
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=(0, view.kv_len, view.q_len, 0),
            aspect=_aspect(view.q_len, view.kv_len),
        )
        axes[1].set_title(
            f"mask: {allowed} of {mask.numel()} pairs allowed ({_percent(allowed, mask.numel())})",
            fontsize=9,
        )
        axes[1].set_xlabel("key position")
        axes[1].set_ylabel("query position")
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as err:
        raise ShowError(f"cannot write {path}: {err.strerror or err}") from None


def _aspect(height: int, width: int) -> str:
    # True proportions unless they would squash the picture into a sliver.
    return "equal" if 1 / 8 <= height / width <= 8 else "auto"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"
