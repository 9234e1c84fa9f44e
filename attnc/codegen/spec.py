"""`KernelSpec`: everything the attention templates need to know about one compiled pattern.

A spec is frozen and typed; each decision about the kernel is made once, here, and the templates only
place what it holds. It depends on the pattern alone (never on lengths, head dims or dtypes, which are
kernel arguments and `tl.constexpr`s), so one rendered source serves every launch of the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnc.codegen.emit import Assign


@dataclass(frozen=True)
class InputArg:
    """An `input` tensor as kernel arguments: `{arg}_ptr`, `{arg}_dim{i}` and `{arg}_stride{i}` for
    each of its `rank` axes. Bool inputs are passed as uint8."""

    name: str
    arg: str
    dtype: str
    rank: int

    @property
    def scalars(self) -> tuple[str, ...]:
        """Its int arguments: the dims, then the strides."""
        dims = tuple(f"{self.arg}_dim{i}" for i in range(self.rank))
        return dims + tuple(f"{self.arg}_stride{i}" for i in range(self.rank))


@dataclass(frozen=True)
class KeyRange:
    """One conjunct's closed-form key positions over the query tile: the prologue variables holding
    its hull `[lo, hi]` and its FULL core `[full_lo, full_hi]` (`derive-ranges`)."""

    lo: str
    hi: str
    full_lo: str
    full_hi: str


@dataclass(frozen=True)
class Body:
    """The statements of one kind of key tile, after `s` (the scaled score) is known: `score` is the
    variable of the modified score (None: `s` itself), `mask` the variable of the mask (None: no
    mask is evaluated on this kind of tile)."""

    lines: tuple[Assign, ...]
    score: str | None
    mask: str | None


@dataclass(frozen=True)
class KernelSpec:
    """One pattern's forward kernel.

    pattern:    the pattern's name with its parameters (for the header comment).
    inputs:     the `input` tensors, in declaration order.
    prologue:   statements run once per query tile: hoisted values (`fuse`) and the range bounds.
    kv_ranges:  analytic plans: one `KeyRange` per conjunct; None for metadata plans.
    metadata_b, metadata_h: metadata plans: whether the metadata has a batch / head axis.
    masked:     the body of PARTIAL key tiles (mask evaluated, and the key length checked).
    full:       the body of FULL key tiles (no mask).
    helpers:    the helper functions the statements call (`floordiv`, `floormod`, `tanh`).
    """

    pattern: str
    inputs: tuple[InputArg, ...]
    prologue: tuple[Assign, ...]
    kv_ranges: tuple[KeyRange, ...] | None
    metadata_b: bool
    metadata_h: bool
    masked: Body
    full: Body
    helpers: tuple[str, ...]

    @property
    def analytic(self) -> bool:
        return self.kv_ranges is not None
