"""`KernelSpec`: everything the attention templates need to know about one compiled pattern.

A spec is frozen and typed; each decision about the kernel is made once, here, and the templates only
place what it holds. It depends on the pattern's structure alone (never on lengths, head dims or dtypes,
which are kernel arguments and `tl.constexpr`s, nor on the pattern's name), so one rendered source serves
every launch of the pattern and every pattern of the same structure.

User text reaches a rendered kernel only as input names inside identifiers, and only through
`InputArg`: its names are the input's name, checked to be a plain ASCII identifier, inside a namespace
no template name uses (`in_`, `grad_in_`, `GRAD_in_`), with a suffix free of underscores, so that no
two inputs' arguments can be the same name (`lower.render` checks the rendered source for it). Runtime
parameters are kernel arguments named by position (`ParamArg`: `param_0`, `param_1`, ...), in a
namespace of their own (`PARAM_NAMESPACE`), checked the same way: no parameter's name is rendered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from attnc.codegen.emit import Assign, bit_args, input_arg, param_arg
from attnc.codegen.signature import (
    Signature,
    dkv_signature,
    dq_signature,
    forward_signature,
    preprocess_signature,
)
from attnc.errors import InternalError

# What an input's name may be: the grammar's NAME. Anything else reaching the code generator is a bug.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z", re.ASCII)

# The prefixes of every kernel argument named after an input (no name the templates define starts so).
INPUT_NAMESPACES = ("in_", "grad_in_", "GRAD_in_")
# The prefix of every kernel argument that passes a runtime parameter.
PARAM_NAMESPACE = "param_"


@dataclass(frozen=True)
class ParamArg:
    """A runtime parameter as a kernel argument `arg` (`param_<index>`, its position among the bound
    pattern's `params`), listed in the kernels' `do_not_specialize`. `type` is "int" (passed as a
    Python int, int32 in the kernel) or "float" (passed as the int64 bit pattern of the float64 value,
    which the kernel bitcasts back: `runtime/launch.py`)."""

    index: int
    arg: str
    type: str

    def __post_init__(self) -> None:
        if self.arg != param_arg(self.index) or self.type not in ("int", "float"):
            raise InternalError(f"bad runtime parameter argument {self!r}")


@dataclass(frozen=True)
class InputArg:
    """An `input` tensor as kernel arguments: `in_<name>_ptr`, `in_<name>_dim<i>` and
    `in_<name>_stride<i>` for each of its `rank` axes (`arg` is `in_<name>`); in the backward, its
    gradient buffer `grad_in_<name>_ptr`, `grad_in_<name>_stride<i>` and the flag `GRAD_in_<name>`.
    Every suffix is free of underscores, so the name is what lies between the namespace and the last
    underscore: two inputs never share an argument. Bool inputs are passed as uint8. `covers`: per
    axis, the size the tensor must cover at a launch ("BATCH", "KV_LEN": the kernels read it there
    without a bound test, `emit.covered_sizes`) or None.

    `bits`: a bool input the kernels also read as its bits packed along its last axis
    (`emit.Emitter._load_bits`: a key column `flag[b, kv]`), passed as well as int32 words
    `in_<name>_bits` (bit i of word j: the element at position 32 j + i of the last axis, 0 past its
    end) with strides `in_<name>_bitstride<i>` and the count of words along the last axis,
    `in_<name>_bitwords` (`runtime/launch.py`'s `pack_bits`)."""

    name: str
    arg: str
    dtype: str
    rank: int
    covers: tuple[str | None, ...]
    bits: bool = False

    def __post_init__(self) -> None:
        if not _IDENTIFIER.match(self.name) or self.arg != input_arg(self.name):
            raise InternalError(f"input {self.name!r} cannot name kernel arguments (as {self.arg!r})")
        if len(self.covers) != self.rank:
            raise InternalError(f"input {self.name!r}: {self.rank} axes, {len(self.covers)} sizes to cover")
        if self.bits and (self.dtype != "bool" or self.rank == 0):
            raise InternalError(f"input {self.name!r}: only a bool input with an axis is read as bits")

    @property
    def ptr(self) -> str:
        return f"{self.arg}_ptr"

    @property
    def scalars(self) -> tuple[str, ...]:
        """Its int arguments: the dims, then the strides."""
        dims = tuple(f"{self.arg}_dim{i}" for i in range(self.rank))
        return dims + tuple(f"{self.arg}_stride{i}" for i in range(self.rank))

    @property
    def bit_args(self) -> tuple[str, str, tuple[str, ...]]:
        """Its packed bits' arguments (`bits`): the words' pointer, their count along the last axis,
        their strides."""
        return bit_args(self.arg, self.rank)

    @property
    def grad_ptr(self) -> str:
        """The float64 buffer its gradient is added to (backward)."""
        return f"grad_{self.arg}_ptr"

    @property
    def grad_strides(self) -> tuple[str, ...]:
        return tuple(f"grad_{self.arg}_stride{i}" for i in range(self.rank))

    @property
    def grad_flag(self) -> str:
        """The `tl.constexpr` that says whether to compute its gradient (`runtime/launch.py`)."""
        return f"GRAD_{self.arg}"


# The most conjuncts whose cores the kernels merge (`core_merge_rounds`): the merge is
# conjuncts * (conjuncts - 1)**2 scalar updates per tile row, few for the usual 1 to 4 conjuncts.
CORE_MERGE_LIMIT = 4


def core_merge_rounds(conjuncts: int) -> int:
    """How many rounds of pairwise merging turn each conjunct's core (of an analytic plan) into the
    component of the union of all cores it lies in: conjuncts - 1 (a chain of touching cores grows by
    one link per round), or 0 past `CORE_MERGE_LIMIT` (a tile is then FULL only when one core holds
    it). The kernels (`_common.py.jinja`, `analytic_loops`) and the plan (`runtime/plan.py`) both
    follow this, so they agree on every tile."""
    return conjuncts - 1 if 1 <= conjuncts <= CORE_MERGE_LIMIT else 0


@dataclass(frozen=True)
class KeyRange:
    """One conjunct's closed-form positions along one axis over a tile of the other (keys over a query
    tile, or queries over a key tile): the variables holding its hull `[lo, hi]` and its FULL core
    `[full_lo, full_hi]` (`derive-ranges`)."""

    lo: str
    hi: str
    full_lo: str
    full_hi: str


@dataclass(frozen=True)
class InputGrad:
    """One load of a float input in the score, as the dQ kernel adds its share to the input's gradient:
    `grad` += dz * `value` at `offset` where `valid`, with dz = d loss / d score. The address depends on
    the query position (`over_q`) and on the key position (`over_kv`) or not: the share is summed over
    the axes it does not depend on before the atomic add."""

    input: InputArg
    value: str
    offset: str
    valid: str
    over_q: bool
    over_kv: bool


@dataclass(frozen=True)
class Body:
    """The statements of one kind of tile, after `s` (the scaled score) is known: `score` is the
    variable of the modified score (None: `s` itself), `mask` the variable of the mask (None: no
    mask is evaluated on this kind of tile). Backward bodies add `dscore`, the variable of d score /
    d s (None: 1), and the input gradients. `score_log2`: the forward's `score` is already multiplied
    by log2(e) (folded into the score's last multiply by a loop-invariant factor, `c * f` as
    `f * (c * LOG2E)`): one multiply less per score. `scale_folded`: the forward's `s` is the unscaled
    product, and the score's only uses of it, `s / c` and `s * c` by a factor the same for the whole
    tile, take the scale into that factor (`Emitter.fold_scale`): one multiply less per score."""

    lines: tuple[Assign, ...]
    score: str | None
    mask: str | None
    dscore: str | None = None
    grads: tuple[InputGrad, ...] = ()
    score_log2: bool = False
    scale_folded: bool = False


@dataclass(frozen=True)
class KernelSpec:
    """One pattern's forward kernel.

    inputs:     the `input` tensors, in declaration order.
    params:     the runtime parameters, in the bound pattern's order (after the inputs' arguments).
    prologue:   statements run once per query tile: hoisted values (`fuse`) and the range bounds.
    kv_ranges:  analytic plans: one `KeyRange` per conjunct; None for metadata plans.
    metadata_b, metadata_h: metadata plans: whether the metadata has a batch / head axis.
    masked:     the body of PARTIAL key tiles (mask evaluated, and the key length checked).
    full:       the body of FULL key tiles (no mask).
    helpers:    the helper functions the statements call (`floordiv`, `floormod`, `tanh`).
    """

    inputs: tuple[InputArg, ...]
    params: tuple[ParamArg, ...]
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

    @property
    def core_merge_rounds(self) -> int:
        return core_merge_rounds(len(self.kv_ranges or ()))

    @cached_property
    def signature(self) -> Signature:
        """`attnc_fwd`'s arguments (`signature.py`), from which its `def` and its launch are made."""
        return forward_signature(self.inputs, self.params, self.analytic)

    @property
    def signatures(self) -> tuple[Signature, ...]:
        return (self.signature,)


@dataclass(frozen=True)
class BackwardSpec:
    """One pattern's backward kernels: the dQ kernel (a query tile, looping over key tiles as the
    forward does) and the dK/dV kernel (a key tile, looping over the query tiles of each query head
    that shares it).

    inputs, params, metadata_b, metadata_h, helpers: as in `KernelSpec` (the parameters' arguments
                 follow the gradient buffers').
    grad_inputs: the inputs that can have a gradient (a float input the score reads, with a derivative
                 that is not zero), in declaration order.
    dq_rows:     values computed once per query tile for the dQ kernel (hoisted by `fuse`).
    dq_prologue: statements of the dQ kernel's key ranges (analytic plans), after `dq_rows`.
    kv_ranges:   analytic plans: one `KeyRange` of key positions per conjunct; None for metadata.
    dq_masked, dq_full: the dQ kernel's bodies (with the input gradients).
    dkv_rows:    values computed per query tile visited by the dK/dV kernel.
    dkv_prologue: statements of the dK/dV kernel's query ranges, per (key tile, query head).
    q_ranges:    analytic plans: one `KeyRange` of query positions per conjunct; None for metadata.
    dkv_masked, dkv_full: the dK/dV kernel's bodies.
    """

    inputs: tuple[InputArg, ...]
    params: tuple[ParamArg, ...]
    grad_inputs: tuple[InputArg, ...]
    metadata_b: bool
    metadata_h: bool
    dq_rows: tuple[Assign, ...]
    dq_prologue: tuple[Assign, ...]
    kv_ranges: tuple[KeyRange, ...] | None
    dq_masked: Body
    dq_full: Body
    dkv_rows: tuple[Assign, ...]
    dkv_prologue: tuple[Assign, ...]
    q_ranges: tuple[KeyRange, ...] | None
    dkv_masked: Body
    dkv_full: Body
    helpers: tuple[str, ...]

    @property
    def analytic(self) -> bool:
        return self.kv_ranges is not None

    @property
    def core_merge_rounds(self) -> int:
        return core_merge_rounds(len(self.kv_ranges or ()))

    @cached_property
    def signatures(self) -> tuple[Signature, ...]:
        """The arguments of `attnc_bwd_preprocess`, `attnc_bwd_dq` and `attnc_bwd_dkv` (`signature.py`)."""
        return (
            preprocess_signature(),
            dq_signature(self.inputs, self.params, self.grad_inputs, self.analytic),
            dkv_signature(self.inputs, self.params, self.grad_inputs, self.analytic),
        )
