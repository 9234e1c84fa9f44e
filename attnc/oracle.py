"""The dense oracle: evaluates a bound pattern's IR on index grids with torch (int64 / float64).

This is the judge every kernel is tested against, so it is written for clarity, not speed, and shares
nothing with the kernel path but the IR it reads: each op's meaning is spelled out here once more,
following `ir.fold` (floor `//` and `%`, division by zero giving 0, out-of-range loads giving 0/false),
and `floor` / `ceil` saturating at the ends of int64 (`analysis/value_ranges.py`, as the kernels do).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from attnc.analysis import value_ranges
from attnc.analysis.summaries import RangeTable, TileSpan, box_bound, static_widths
from attnc.ir import reduce as reductions
from attnc.ir.nodes import InputDecl, Node, Op, PatternIR, Type

_DTYPES = {Type.INT: torch.int64, Type.FLOAT: torch.float64, Type.BOOL: torch.bool}


@dataclass
class Env:
    """What names mean during one evaluation. Grids broadcast to [B, H, Lq, Lkv].

    `points` replaces the grid of some index variables by given index tensors (to evaluate the mask on
    chosen positions only); `tiles` gives the tile box variables of derived expressions. `params` gives
    the runtime parameters' values by name (`Op.PARAM`, see `passes/bind_params.py`): every evaluator
    of a bound pattern (this oracle, the plans, the launchers) reads them from here.

    Rows and positions: `q_len` and `kv_len` count the rows of q and of k/v (the grid); row i of q is
    the pattern's position `q_offset + i` (`q_offset` an int, or an int tensor [B]: one per batch row,
    `kern(q, k, v, q_offset=...)`), row j of k/v position `kv_offset + j`. The pattern's sizes are
    `Q_LEN = q_offset + q_len` and `KV_LEN = kv_offset + kv_len` unless `q_size` / `kv_size` say
    otherwise (a chunk of a longer sequence: context parallelism). `points` and `tiles` are positions.
    `kv_rows` (decoding, `Kernel.decode`; packed sequences, `Kernel.varlen`): an int tensor [B], the
    valid key rows of each batch row; rows past them do not exist (never allowed), and KV_LEN is
    `kv_offset + kv_rows[b]`. `q_rows` likewise for queries (packed sequences): Q_LEN is then
    `q_offset + q_rows[b]`.
    """

    batch: int
    num_heads: int
    q_len: int
    kv_len: int
    device: torch.device
    inputs: Mapping[str, torch.Tensor]
    score: torch.Tensor | None = None
    points: Mapping[str, torch.Tensor] = field(default_factory=dict)
    tiles: Mapping[str, torch.Tensor] = field(default_factory=dict)
    tables: dict[tuple[str, int], RangeTable] = field(default_factory=dict, repr=False)
    # The tile boxes' static extents by axis ("q", "kv"), where `tiles` holds boxes: what a range
    # summary over several axes enumerates without reading the boxes' widths (`summaries.box_bound`).
    tile_spans: Mapping[str, TileSpan] = field(default_factory=dict)
    float_dtype: torch.dtype = torch.float64  # the type floats are computed in (see `attention`)
    params: Mapping[str, int | float] = field(default_factory=dict)
    q_offset: int | torch.Tensor = 0
    kv_offset: int = 0
    q_size: int | None = None
    kv_size: int | None = None
    kv_rows: torch.Tensor | None = None
    q_rows: torch.Tensor | None = None
    # Whether range summaries may reuse an input's tables from an earlier evaluation
    # (`RangeTable.of`, keyed by the tensor's identity and version counter, blind to writes that do
    # not move it): only the launches' own plans (`launch.PlanCache`, which has that blind spot
    # already); `kern.plan` and `kern.block_map` always read the inputs' current values.
    reuse_tables: bool = False

    def var(self, name: str) -> torch.Tensor:
        if name in self.points:
            return self.points[name]
        if name in self.tiles:
            return self.tiles[name]
        sizes = {"b": (self.batch, 0), "h": (self.num_heads, 1), "q": (self.q_len, 2), "kv": (self.kv_len, 3)}
        n, axis = sizes[name]
        shape = [1, 1, 1, 1]
        shape[axis] = n
        grid = torch.arange(n, device=self.device, dtype=torch.int64).reshape(shape)
        if name == "q":
            return grid + self.q_shift()
        if name == "kv" and self.kv_offset:
            return grid + self.kv_offset
        return grid

    def q_shift(self) -> int | torch.Tensor:
        """The position of query row 0: an int, or int64 [B, 1, 1, 1] for per-row offsets."""
        if isinstance(self.q_offset, torch.Tensor):
            return self.q_offset.to(device=self.device, dtype=torch.int64).reshape(-1, 1, 1, 1)
        return self.q_offset

    def size(self, name: str) -> int | torch.Tensor:
        """A size of the pattern language: an int, or int64 [B, 1, 1, 1] (Q_LEN under per-row offsets)."""
        if name == "Q_LEN":
            if self.q_rows is not None:
                return (
                    self.q_rows.to(device=self.device, dtype=torch.int64).reshape(-1, 1, 1, 1)
                    + self.q_shift()
                )
            return self.q_size if self.q_size is not None else self.q_shift() + self.q_len
        if name == "KV_LEN":
            if self.kv_rows is not None:
                return (
                    self.kv_rows.to(device=self.device, dtype=torch.int64).reshape(-1, 1, 1, 1)
                    + self.kv_offset
                )
            return self.kv_size if self.kv_size is not None else self.kv_offset + self.kv_len
        return {"BATCH": self.batch, "NUM_HEADS": self.num_heads}[name]

    def largest_sizes(self) -> tuple[int, int]:
        """(Q_LEN, KV_LEN) at their largest over the batch rows: what `check_sizes` bounds. Reads a per-row
        offset tensor's values (a device sync: the callers check per-row offsets only where cheap)."""
        sizes = []
        for name, rows in (("Q_LEN", self.q_len), ("KV_LEN", self.kv_len)):
            size = self.size(name)
            if isinstance(size, torch.Tensor):
                size = int(size.max()) if size.numel() else rows
            sizes.append(size)
        return sizes[0], sizes[1]

    def with_tiles(self, points: Mapping[str, torch.Tensor], tiles: Mapping[str, torch.Tensor]) -> Env:
        """This environment with index variables and tile bounds bound to the given (broadcasting)
        position tensors (the geometry kept: sizes and offsets)."""
        return replace(self, points=points, tiles=tiles, score=None)


def _scalar(value: int | float | bool, type_: Type, env: Env) -> torch.Tensor:
    dtype = env.float_dtype if type_ is Type.FLOAT else _DTYPES[type_]
    return torch.tensor(value, dtype=dtype, device=env.device)


def _load(
    decl: InputDecl,
    tensor: torch.Tensor,
    indices: list[torch.Tensor],
    float_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """tensor[indices] where every index is in range, else 0 / false."""
    if not indices:  # a 0-d input: its one value
        return tensor.reshape(()).to(float_dtype if decl.type is Type.FLOAT else _DTYPES[decl.type])
    indices = list(torch.broadcast_tensors(*indices))
    valid = torch.ones_like(indices[0], dtype=torch.bool)
    flat = torch.zeros_like(indices[0])
    stride = 1
    for axis in reversed(range(len(indices))):
        extent = tensor.shape[axis]
        index = indices[axis]
        valid = valid & (index >= 0) & (index < extent)  # not in place: `valid` may broadcast (vmap)
        flat = flat + index.clamp(0, max(extent - 1, 0)) * stride
        stride *= extent
    values = tensor.reshape(-1).to(float_dtype if decl.type is Type.FLOAT else _DTYPES[decl.type])
    if values.numel() == 0:
        return torch.zeros(flat.shape, dtype=values.dtype, device=flat.device)
    gathered = values[flat]
    return torch.where(valid, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))


def _range(node: Node, decl: InputDecl, env: Env, args: list[torch.Tensor]) -> torch.Tensor:
    """range_min / range_max of an input over an index box (`analysis/summaries.py`): exact over a
    box along one axis, or along several where the narrower ones span a few positions (block maps)."""
    tensor = env.inputs[decl.name]
    ranged = [i for i in range(len(decl.dims)) if node.args[2 * i] != node.args[2 * i + 1]]
    if not ranged:  # a single position
        return _load(decl, tensor, args[0::2]).to(_DTYPES[decl.type])

    def table(axis: int) -> RangeTable:
        if (decl.name, axis) not in env.tables:
            summary = RangeTable.of if env.reuse_tables else RangeTable.build
            env.tables[decl.name, axis] = summary(tensor, axis)
        return env.tables[decl.name, axis]

    # No host synchronisation while a CUDA graph captures the plan's build (`summaries.box_bound`).
    capturing = tensor.is_cuda and torch.cuda.is_current_stream_capturing()
    widths = static_widths(node.args, ranged, env.tile_spans, env.params)
    maximum = node.op is Op.RANGE_MAX
    bound = box_bound(tensor, args[0::2], args[1::2], ranged, table, maximum, not capturing, widths)
    return bound.to(_DTYPES[decl.type])


def _floordiv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    zero = b == 0
    safe = torch.where(zero, torch.ones_like(b), b)
    return torch.where(zero, torch.zeros_like(a), torch.div(a, safe, rounding_mode="floor"))


def _mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    zero = b == 0
    safe = torch.where(zero, torch.ones_like(b), b)
    return torch.where(zero, a, torch.remainder(a, safe))


def _shift_count(n: torch.Tensor) -> torch.Tensor:
    """A shift count clamped to [0, 63], as `ir.fold.shift_count`."""
    return n.clamp(0, 63)


def _to_int(x: torch.Tensor) -> torch.Tensor:
    """An integral float as int64, saturating (`value_ranges.FLOAT_TO_INT`): at or beyond
    +-(2**63 - 1) it is +-(2**63 - 1), NaN gives 0. A bare cast is undefined outside int64."""
    inside = (x > -(2.0**63)) & (x < 2.0**63)  # the floats inside are at most 2**63 - 1024 in magnitude
    exact = torch.where(inside, x, torch.zeros_like(x)).to(torch.int64)
    edge = torch.where(x > 0, (1 << 63) - 1, torch.where(x < 0, 1 - (1 << 63), 0))
    return torch.where(inside, exact, edge)


_ELEMENTWISE = {
    Op.ADD: torch.add,
    Op.SUB: torch.sub,
    Op.MUL: torch.mul,
    Op.DIV: torch.div,
    Op.FLOORDIV: _floordiv,
    Op.MOD: _mod,
    Op.UDIV: _floordiv,
    Op.UMOD: _mod,
    Op.NEG: torch.neg,
    Op.ABS: torch.abs,
    Op.MIN: torch.minimum,
    Op.MAX: torch.maximum,
    Op.EXP: torch.exp,
    Op.EXP2: torch.exp2,
    Op.LOG: torch.log,
    Op.LOG2: torch.log2,
    Op.SQRT: torch.sqrt,
    Op.TANH: torch.tanh,
    Op.SIGMOID: torch.sigmoid,
    Op.SIN: torch.sin,
    Op.COS: torch.cos,
    Op.TAN: torch.tan,
    Op.ERF: torch.erf,
    Op.BITAND: torch.bitwise_and,
    Op.BITOR: torch.bitwise_or,
    Op.BITXOR: torch.bitwise_xor,
    Op.SHL: lambda a, n: torch.bitwise_left_shift(a, _shift_count(n)),
    Op.SHR: lambda a, n: torch.bitwise_right_shift(a, _shift_count(n)),
    Op.EQ: torch.eq,
    Op.NE: torch.ne,
    Op.LT: torch.lt,
    Op.LE: torch.le,
    Op.GT: torch.gt,
    Op.GE: torch.ge,
    Op.NOT: torch.logical_not,
    Op.WHERE: torch.where,
}


def evaluate(
    root: Node, pattern: PatternIR, env: Env, known: Mapping[Node, torch.Tensor] | None = None
) -> torch.Tensor:
    """The value of an expression of a bound, inlined pattern at every grid point (broadcastable).
    `known`: values already computed (a reduction's variable, inside its loop)."""
    values: dict[Node, torch.Tensor] = dict(known or {})
    # Reductions first, each a loop over its variable (`_reduction`); their terms are not walked here.
    outermost = [root] if root.op is Op.REDUCE and root not in values else []
    for node in root.walk(skip=lambda n: n in values or n.op is Op.REDUCE):
        outermost.extend(a for a in node.args if a.op is Op.REDUCE and a not in values)
    for node in outermost:
        if node not in values:
            values[node] = _reduction(node, pattern, env, values)
    for node in root.walk(skip=values.__contains__):
        args = [values[a] for a in node.args]
        op = node.op
        if op is Op.CONST:
            result = _scalar(node.attr, node.type, env)  # type: ignore[arg-type]
        elif op is Op.VAR:
            result = env.var(str(node.attr))
        elif op is Op.SIZE:
            size = env.size(str(node.attr))
            result = size if isinstance(size, torch.Tensor) else _scalar(size, Type.INT, env)
        elif op is Op.PARAM:
            assert str(node.attr) in env.params, f"no value for the runtime parameter {node.attr}"
            # As given (the dtype converts an int given for a float): a `torch.SymInt` under torch.compile
            # is not forced to a constant here.
            result = _scalar(env.params[str(node.attr)], node.type, env)
        elif op is Op.SCORE:
            assert env.score is not None, "the score is only defined inside score"
            result = env.score
        elif op is Op.LOAD:
            decl = pattern.input(str(node.attr))
            assert decl is not None
            result = _load(decl, env.inputs[decl.name], args, env.float_dtype)
        elif op in (Op.RANGE_MIN, Op.RANGE_MAX):
            decl = pattern.input(str(node.attr))
            assert decl is not None
            result = _range(node, decl, env, args)
        elif op is Op.TOFLOAT:
            result = args[0].to(torch.float64)
        elif op is Op.FLOOR:
            result = _to_int(torch.floor(args[0]))
        elif op is Op.CEIL:
            result = _to_int(torch.ceil(args[0]))
        elif op is Op.AND:
            result = args[0]
            for arg in args[1:]:
                result = result & arg
        elif op is Op.OR:
            result = args[0]
            for arg in args[1:]:
                result = result | arg
        elif op in _ELEMENTWISE:
            result = _ELEMENTWISE[op](*args)
        else:
            raise AssertionError(f"the oracle cannot evaluate {op}: the pattern is not inlined and bound")
        values[node] = result
    return values[root]


def _reduction(node: Node, pattern: PatternIR, env: Env, values: dict[Node, torch.Tensor]) -> torch.Tensor:
    """A bounded reduction (`ir/reduce.py`): its term for each value of its variable, combined left to
    right (a max / min's derivative, `dmax` / `dmin`, as `analysis/derivative.py` defines it)."""
    kind, _ = reductions.parts(node)
    lo, hi = (int(evaluate(b, pattern, env, values)) for b in node.args[:2])
    variable = reductions.variable(node)
    acc: torch.Tensor | None = None
    dacc: torch.Tensor | None = None
    for i in range(lo, hi):
        inner = {**values, variable: _scalar(i, Type.INT, env)}
        term = evaluate(node.args[2], pattern, env, inner)
        dterm = evaluate(node.args[3], pattern, env, inner) if kind in ("dmax", "dmin") else None
        if acc is None:
            acc, dacc = term, dterm
        elif kind == "sum":
            acc = acc + term
        elif kind == "any":
            acc = acc | term
        elif kind == "all":
            acc = acc & term
        elif kind in ("max", "min"):
            acc = torch.maximum(acc, term) if kind == "max" else torch.minimum(acc, term)
        else:  # the derivative of the term max(acc, term) selects; half of each at a tie
            wins, loses = (acc > term, acc < term) if kind == "dmax" else (acc < term, acc > term)
            assert dacc is not None and dterm is not None
            dacc = torch.where(wins, dacc, torch.where(loses, dterm, 0.5 * (dacc + dterm)))
            acc = torch.maximum(acc, term) if kind == "dmax" else torch.minimum(acc, term)
    if acc is None:
        return _scalar(reductions.empty(kind, node.type), node.type, env)
    return dacc if dacc is not None else acc


def check_sizes(pattern: PatternIR, env: Env) -> None:
    """An `InputError` for sizes beyond those whose int values `bind-params` proved inside int64."""
    q_size, kv_size = env.largest_sizes()
    value_ranges.check_sizes(
        pattern.loc,
        batch=env.batch,
        num_heads=env.num_heads,
        q_len=env.q_len,
        kv_len=env.kv_len,
        Q_LEN=q_size,
        KV_LEN=kv_size,
    )


def mask(pattern: PatternIR, env: Env) -> torch.Tensor:
    """The dense bool mask of a bound pattern, broadcastable to [B, H, Lq, Lkv]."""
    check_sizes(pattern, env)
    grid = (1, 1, env.q_len, env.kv_len)
    if pattern.mask is None and env.kv_rows is None and env.q_rows is None:
        return torch.ones(grid, dtype=torch.bool, device=env.device)
    if pattern.mask is None:
        result = torch.ones(grid, dtype=torch.bool, device=env.device)
    else:
        result = evaluate(pattern.mask, pattern, env)
    if env.kv_rows is not None:  # rows past a batch row's valid keys do not exist
        valid = torch.arange(env.kv_len, device=env.device).reshape(1, 1, 1, -1)
        result = result & (valid < env.kv_rows.to(env.device).reshape(-1, 1, 1, 1))
    if env.q_rows is not None:  # nor rows past its queries
        valid = torch.arange(env.q_len, device=env.device).reshape(1, 1, -1, 1)
        result = result & (valid < env.q_rows.to(env.device).reshape(-1, 1, 1, 1))
    return result.expand(torch.broadcast_shapes(result.shape, grid))


def attention(
    pattern: PatternIR,
    env: Env,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    precision: torch.dtype = torch.float64,
    return_max: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention: (out [B, Hq, Lq, Dv], lse [B, Hq, Lq]), in `precision`.

    Scores are `(q . k) * scale`, then the pattern's score function, then the mask. A query with no
    allowed key (or only -inf scores) gets output 0 and lse -inf. The judge computes in float64; a
    lower `precision` (scores, score function, softmax and output in that type; the mask is exact
    always) is the same-dtype dense computation the kernels' error is measured against. With
    `return_max`, also each query's largest allowed score (-inf where it sees none).
    """
    check_sizes(pattern, env)
    group = q.shape[1] // k.shape[1]
    k_ = k.to(precision).repeat_interleave(group, dim=1)
    v_ = v.to(precision).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(precision), k_) * scale
    if pattern.score is not None:
        env.score, env.float_dtype = scores, precision
        try:
            scores = evaluate(pattern.score, pattern, env).expand_as(scores).to(precision)
        finally:
            env.score, env.float_dtype = None, torch.float64
    allowed = mask(pattern, env).expand_as(scores)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if scores.shape[-1] == 0:  # no keys at all: every row is empty
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    else:
        row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    shifted = torch.where(empty, torch.zeros_like(scores), scores - torch.where(empty, 0.0, row_max))
    weights = torch.where(allowed & ~empty, torch.exp(shifted), torch.zeros_like(scores))
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhqk,bhkd->bhqd", weights, v_) / torch.where(empty, 1.0, total)
    out = torch.where(empty, torch.zeros_like(out), out)
    lse = torch.where(empty, float("-inf"), row_max + torch.log(torch.where(empty, 1.0, total))).squeeze(-1)
    if return_max:
        return out, lse, row_max.squeeze(-1)
    return out, lse
