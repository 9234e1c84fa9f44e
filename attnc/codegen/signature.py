"""The attention kernels' arguments, described once (issue 18 item 1).

A `Signature` lists a kernel's arguments in order: each one's name, its kind (a tensor, a stride, an int,
a float or a `tl.constexpr`) and its source, the group of values the launcher (`runtime/launch.py`)
takes it from. The templates render the kernel's `def` and its `do_not_specialize` list from it, and
the launcher calls the kernel by keyword with `Signature.arguments`, which takes the launcher's values
group by group and refuses any group that names other arguments than the description: a kernel and its
launch cannot disagree silently (Triton's interpreter drops an unknown keyword without a word). Its
`contracts` are what the kernels assume of their constexprs, rendered as `tl.static_assert`s.

The signatures depend on the spec's inputs, runtime parameters and plan kind only (`KernelSpec` and
`BackwardSpec` build them, as properties: they are not in the spec's repr, the cache key).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from attnc.errors import InternalError

Kind = Literal["tensor", "stride", "int", "float", "constexpr"]


@dataclass(frozen=True)
class KernelArg:
    """One kernel argument. `source`: the launcher's group of values it comes from. An `int` is
    specialised by Triton on its value (1, divisibility by 16: a new compile per class) unless
    `specialize` is False (lengths, offsets, runtime parameters: one compile for all their values).
    Triton also types an unannotated int by its value (int32 where it fits, else int64: a compile
    each); `annotation` (`tl.int64`) fixes the type of one that may take either."""

    name: str
    kind: Kind
    source: str
    specialize: bool = True
    annotation: str = ""

    @property
    def parameter(self) -> str:
        """The argument as the kernel's `def` declares it."""
        if self.kind == "constexpr":
            return f"{self.name}: tl.constexpr"
        return f"{self.name}: {self.annotation}" if self.annotation else self.name


@dataclass(frozen=True)
class Signature:
    """A kernel's arguments in the order of its `def`, and its constexpr contracts: (condition, what
    it says) pairs, each rendered as `tl.static_assert(condition, "...")` at the top of the kernel."""

    kernel: str
    args: tuple[KernelArg, ...]
    contracts: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        names = [a.name for a in self.args]
        if len(names) != len(set(names)):
            raise InternalError(f"{self.kernel}: an argument is described twice in {names}")

    @cached_property
    def _sources(self) -> dict[str, frozenset[str]]:
        sources: dict[str, set[str]] = {}
        for arg in self.args:
            sources.setdefault(arg.source, set()).add(arg.name)
        return {source: frozenset(names) for source, names in sources.items()}

    @cached_property
    def parameters(self) -> tuple[KernelArg, ...]:
        """The arguments in the order of the `def`: the runtime ones, then the constexprs."""
        return tuple(a for a in self.args if a.kind != "constexpr") + tuple(
            a for a in self.args if a.kind == "constexpr"
        )

    def parameter_lines(self) -> list[str]:
        """The `def`'s parameters: the first source's runtime arguments, the others, the constexprs,
        each wrapped."""
        runtime = [a for a in self.parameters if a.kind != "constexpr"]
        first = [a.parameter for a in runtime if a.source == runtime[0].source]
        rest = [a.parameter for a in runtime[len(first) :]]
        constexprs = [a.parameter for a in self.parameters if a.kind == "constexpr"]
        return [line for names in (first, rest, constexprs) for line in _wrap(names)]

    def definition(self) -> str:
        """The kernel's decorator (`do_not_specialize`: the ints Triton must not specialise on), its
        `def` line and its contracts, as the templates place them."""
        no_specialize = [f'"{a.name}"' for a in self.args if a.kind == "int" and not a.specialize]
        lines = ["@triton.jit(do_not_specialize=[", *(f"    {x}" for x in _wrap(no_specialize)), "])"]
        lines += [f"def {self.kernel}(", *(f"    {x}" for x in self.parameter_lines()), "):"]
        lines += [f'    tl.static_assert({condition}, "{message}")' for condition, message in self.contracts]
        return "\n".join(lines)

    def arguments(self, **sources: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of a launch, from the launcher's values by source (an empty or absent
        source where the description has none); an InternalError naming the arguments where a source
        gives other names than the description's."""
        for source in sources.keys() | self._sources.keys():
            given, expected = sources.get(source), self._sources.get(source, frozenset())
            if given is None or given.keys() != expected:
                given_names = set() if given is None else given.keys()
                missing, extra = sorted(expected - given_names), sorted(given_names - expected)
                raise InternalError(
                    f"{self.kernel}: the launcher's {source!r} values are not the kernel's described "
                    f"arguments (missing {missing}, not arguments {extra})"
                )
        return {arg.name: sources[arg.source][arg.name] for arg in self.parameters}


def _wrap(names: list[str], width: int = 104) -> Iterable[str]:
    """The names, comma-terminated, as lines of at most `width` characters (or one name)."""
    line = ""
    for name in names:
        if line and len(line) + len(name) + 2 > width:
            yield line
            line = ""
        line = f"{line} {name}," if line else f"{name},"
    if line:
        yield line


def _args(source: str, kind: Kind, names: Iterable[str], specialize: bool = True) -> list[KernelArg]:
    return [KernelArg(name, kind, source, specialize) for name in names]


def strides(tensor: str, rows: str = "m") -> tuple[str, ...]:
    """The names of a [batch, heads, length, head dim] tensor's four strides (`rows`: the length axis's
    letter, m for queries, n for keys)."""
    return tuple(f"stride_{tensor}{axis}" for axis in ("b", "h", rows, "d"))


def qkv_strides() -> tuple[str, ...]:
    """q's, k's and v's strides, in the kernels' order (k's and v's along key rows)."""
    return (*strides("q"), *strides("k", "n"), *strides("v", "n"))


def backward_strides(*outputs: str) -> tuple[str, ...]:
    """The backward kernels' strides: q's, k's, v's and dO's, then each output's (dq: query rows; dk,
    dv: key rows)."""
    return (
        *qkv_strides(),
        *strides("do"),
        *(n for out in outputs for n in strides(out, "m" if out == "dq" else "n")),
    )


def values(names: Iterable[str], given: Iterable[Any]) -> dict[str, Any]:
    """`names` paired with the launcher's values, as many of each."""
    return dict(zip(names, given, strict=True))


# What every kernel assumes of its tile and head-dim constexprs (the launcher's `autotune.padded` and
# configurations keep them): `tl.arange` needs powers of two, `tl.dot` at least 16 along each side.
def _powers_of_two(names: tuple[str, ...], at_least: tuple[str, ...] = ()) -> tuple[str, str]:
    conditions = [f"(({n} & ({n} - 1)) == 0) & ({n} >= 16)" for n in names]
    conditions += [f"({n} >= {least})" for n, least in zip(names, at_least, strict=False)]
    bounds = f" and >= {', '.join(at_least)}" if at_least else ""
    kind = "powers of two" if len(names) > 1 else "a power of two"
    return " & ".join(conditions), f"{', '.join(names)}: {kind}, >= 16{bounds}"


TILE_CONTRACTS = (
    _powers_of_two(("D_PAD", "DV_PAD"), ("HEAD_DIM", "HEAD_DIM_V")),
    _powers_of_two(("BLOCK_M", "BLOCK_N")),
)

# The geometry every attention kernel takes (`runtime/launch.py`'s `geometry_args`).
_GEOMETRY = ("Q_ROWS", "KV_ROWS", "Q_SIZE", "KV_SIZE", "q_offset", "kv_offset")
_CONFIG = ("HEAD_DIM", "HEAD_DIM_V", "D_PAD", "DV_PAD", "BLOCK_M", "BLOCK_N", "DOT_PRECISION", "UPCAST_DOT")


def _pattern_args(inputs, params, grad_inputs=None) -> list[KernelArg]:
    """The pattern's own arguments: its input tensors (pointer, dims, strides), in the backward their
    gradient buffers, then its runtime parameters (see `spec.InputArg`, `spec.ParamArg`)."""
    args: list[KernelArg] = []
    for arg in inputs:
        args += _args("inputs", "tensor", [arg.ptr])
        args += _args("inputs", "int", arg.scalars[: arg.rank], specialize=False)
        args += _args("inputs", "stride", arg.scalars[arg.rank :])
        if arg.bits:
            words, count, word_strides = arg.bit_args
            args += _args("inputs", "tensor", [words])
            args += _args("inputs", "int", [count], specialize=False)
            args += _args("inputs", "stride", word_strides)
    for arg in grad_inputs or ():
        args += _args("grads", "tensor", [arg.grad_ptr]) + _args("grads", "stride", arg.grad_strides)
    # A float parameter's int64 bit pattern: 0.0's is 0, which Triton would type int32.
    args += [
        KernelArg(p.arg, "int", "params", False, "tl.int64" if p.type == "float" else "") for p in params
    ]
    return args


def _common(
    analytic: bool, prefix: str, stride_args: list[KernelArg], tail: list[KernelArg]
) -> list[KernelArg]:
    """The arguments after the pattern's that the forward and both backward kernels share, in their
    order (that of the hand-written signatures before them, so that the compiled code is the same): a
    metadata plan's lists (`prefix`: kv or q), the tensors' strides, sizes and geometry, the visit
    counter, the kernel's own `tail`, then the constexprs of the configuration."""
    plan = [] if analytic else _args("plan", "tensor", [f"{prefix}_{x}" for x in _PLAN_LISTS])
    plan += [] if analytic else _args("plan", "int", ["META_HEADS"])
    return [
        *plan,
        *stride_args,
        *_args("sizes", "int", ("BATCH", "NUM_HEADS"), specialize=False),
        *_args("geometry", "int", _GEOMETRY, specialize=False),
        KernelArg("RowOffsets", "tensor", "geometry"),
        KernelArg("GQA_GROUP", "int", "sizes", specialize=False),
        KernelArg("scale", "float", "sizes"),
        KernelArg("Visits", "tensor", "visits"),
        *tail,
        *_args("config", "constexpr", _CONFIG),
        KernelArg("COUNT_VISITS", "constexpr", "visits"),
        *_args("geometry", "constexpr", ("ROW_OFFSETS", "SHIFTED")),
        KernelArg("FAST_MATH", "constexpr", "config"),
        KernelArg("PTX", "constexpr", "config"),
    ]


_PLAN_LISTS = ("partial_counts", "partial_indices", "full_counts", "full_indices")


def forward_signature(inputs, params, analytic: bool) -> Signature:
    """`attnc_fwd`'s arguments (attention_fwd.py.jinja's header says what each is)."""
    stride_args = _args("strides", "stride", qkv_strides())
    layout = [
        *_args("layout", "tensor", ("KvRowCounts", "BlockTable")),
        *_args("layout", "int", ("stride_table", "TABLE_PAGES", "NUM_PAGES"), specialize=False),
        *_args("layout", "tensor", ("CuSeqQ", "CuSeqK")),
        *_args("layout", "int", ("TOTAL_Q", "TOTAL_K"), specialize=False),
        *_args("output", "int", ("split_tiles", "split_out", "split_lse"), specialize=False),
        KernelArg("MaxScores", "tensor", "output"),
    ]
    return Signature(
        "attnc_fwd",
        (
            *_args("tensors", "tensor", ("Q", "K", "V", "Out", "Lse")),
            *_pattern_args(inputs, params),
            *_common(analytic, "kv", [*stride_args, *_args("output", "stride", strides("o"))], layout),
            *_args("layout", "constexpr", ("KV_ROW_COUNTS", "PAGED", "PAGE_SIZE", "VARLEN")),
            *_args("output", "constexpr", ("PACK_GQA", "STORE_MAX")),
            KernelArg("SCALE_NEGATIVE", "constexpr", "sizes"),
        ),
        TILE_CONTRACTS,
    )


def preprocess_signature() -> Signature:
    """`attnc_bwd_preprocess`'s arguments: Delta = rowsum(dO * O)."""
    return Signature(
        "attnc_bwd_preprocess",
        (
            *_args("tensors", "tensor", ("Out", "dOut", "Delta")),
            *_args("strides", "stride", (*strides("o"), *strides("do"))),
            *_args("sizes", "int", ("NUM_HEADS", "Q_ROWS"), specialize=False),
            *_args("config", "constexpr", ("HEAD_DIM_V", "DV_PAD", "BLOCK_M")),
        ),
        (_powers_of_two(("DV_PAD",), ("HEAD_DIM_V",)), _powers_of_two(("BLOCK_M",))),
    )


def dq_signature(inputs, params, grad_inputs, analytic: bool) -> Signature:
    """`attnc_bwd_dq`'s arguments."""
    return Signature(
        "attnc_bwd_dq",
        (
            *_args("tensors", "tensor", ("Q", "K", "V", "dOut", "Lse", "Delta", "dQ")),
            *_pattern_args(inputs, params, grad_inputs),
            *_common(analytic, "kv", _args("strides", "stride", backward_strides("dq")), []),
            *_args("grads", "constexpr", [a.grad_flag for a in grad_inputs]),
            KernelArg("EXACT_DELTA", "constexpr", "delta"),
        ),
        TILE_CONTRACTS,
    )


def dkv_signature(inputs, params, grad_inputs, analytic: bool) -> Signature:
    """`attnc_bwd_dkv`'s arguments."""
    return Signature(
        "attnc_bwd_dkv",
        (
            *_args("tensors", "tensor", ("Q", "K", "V", "dOut", "Lse", "Delta", "dK", "dV")),
            *_pattern_args(inputs, params, grad_inputs),
            *_common(analytic, "q", _args("strides", "stride", backward_strides("dk", "dv")), []),
            *_args("grads", "constexpr", [a.grad_flag for a in grad_inputs]),
        ),
        TILE_CONTRACTS,
    )
