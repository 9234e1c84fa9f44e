"""Running a pattern's kernels: backend, configuration, plan, arguments and grid.

`Forward.run` is what `Kernel.__call__` does once its arguments are checked (through the custom op of
`runtime/autograd.py`), and `Backward.run` what its gradient does. Kernels are called by keyword: each
launch gives its values grouped by source to the kernel's argument description (`codegen/signature.py`,
from which the templates render the kernel's `def`), which refuses a group that names other arguments.
Analytic patterns launch with no plan at all (the kernels derive their own loop bounds); the others
get block-sparse metadata built for the launch's tile size on the tensors' device.

Plans are reused (`PlanCache`): a launch looks for the last plan of the same lengths, batch size, head
count, device, runtime parameter values and inputs (the same tensor objects, at the same version
counter), so consecutive layers of a model and the backward of each share one plan, built once. A
`kern(q, k, v, plan=plan)` call files its plan there first. While a metadata plan is on file, the
launches use its block size (the autotuner chooses among configurations of that block); a backward
whose configurations cannot use it derives the plan's metadata for its own block, once.

`counting_visits` is a debug mode for tests: the kernels count, per tile, the masked and unmasked
visits they make (a constexpr flag; normal launches do not generate the code).
"""

from __future__ import annotations

import contextlib
import functools
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass, replace
from typing import Any, NamedTuple

import torch

from attnc import oracle
from attnc.codegen.emit import WORD_BITS
from attnc.codegen.lower import build_backward_spec
from attnc.codegen.signature import backward_strides, qkv_strides, values
from attnc.codegen.signature import strides as stride_names
from attnc.codegen.spec import BackwardSpec, InputArg, KernelSpec, ParamArg
from attnc.errors import InputError, InternalError
from attnc.ir.nodes import PatternIR
from attnc.runtime import autotune, cache
from attnc.runtime.autotune import Config, LaunchShape
from attnc.runtime.backend import CUDA, INTERPRETER, active
from attnc.runtime.cache import KernelSource, module
from attnc.runtime.plan import BlockSparse, Plan, make_plan

BACKWARD_TEMPLATE = "attention_bwd.py.jinja"
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
MAX_HEAD_DIM = 256


class DeviceLimits(NamedTuple):
    """What the configurations depend on of a device: its name (with its compute capability), its
    shared memory per block (opt-in maximum, bytes) and its NVIDIA architecture (major * 10 + minor:
    90 for an H100; 0 for a ROCm device)."""

    name: str
    shared: int
    arch: int


@functools.lru_cache(maxsize=16)
def _device_limits(index: int) -> DeviceLimits:
    """A CUDA device's `DeviceLimits`."""
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 0
    if not shared:
        import triton

        shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    arch = 0 if torch.version.hip else 10 * props.major + props.minor
    return DeviceLimits(f"{props.name} sm{props.major}{props.minor}", int(shared), arch)


PLAN_CACHE_SIZE = 8
"""Plans each pattern keeps for reuse (those of the last launches with distinct lengths or inputs)."""


def _plan_key(env: oracle.Env) -> tuple | None:
    """What a plan depends on, cheaply: sizes, device, runtime parameter values, and each input's
    identity, version counter, address, shape and strides (a cached plan keeps its inputs alive, so
    no other tensor can take the same `id`). None where an input is an inference tensor, which has
    no version counter: such launches build their own plan."""
    inputs = []
    for name in sorted(env.inputs):
        t = env.inputs[name]
        if t.is_inference():
            return None
        inputs.append((name, id(t), t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype))
    params = tuple(sorted(env.params.items()))
    per_row = []
    for tensor in (env.q_offset, env.q_rows, env.kv_rows):
        if isinstance(tensor, torch.Tensor):  # as an input: the very tensor, unchanged
            if tensor.is_inference():
                return None
            per_row.append(("tensor", id(tensor), tensor._version, tensor.data_ptr()))
        else:
            per_row.append(tensor)
    geometry = (*per_row, env.kv_offset, env.q_size, env.kv_size)
    return env.q_len, env.kv_len, env.batch, env.num_heads, str(env.device), params, tuple(inputs), geometry


class PlanCache:
    """The last `PLAN_CACHE_SIZE` plans of one pattern, by `_plan_key`, each with the block size of its
    last launch (which later launches of the same key keep, so that they need no other metadata)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple, tuple[Plan, tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}  # a pickled kernel keeps no plans: they hold this process's tensors, keyed by their ids

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    def block(self, env: oracle.Env) -> tuple[int, int] | None:
        """The block the launches of these lengths and inputs have used, if a plan is on file."""
        key = _plan_key(env)
        with self._lock:
            entry = self._entries.get(key) if key is not None else None
        return None if entry is None else entry[1]

    def plan(self, pattern: PatternIR, env: oracle.Env, block: tuple[int, int]) -> Plan:
        """The plan on file for these lengths and inputs, for `block` (`Plan.at_block`), or a new one,
        filed."""
        key = _plan_key(env)
        with self._lock:
            entry = self._entries.get(key) if key is not None else None
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is not None:
            return entry[0].at_block(block)
        # Consecutive plans over one unchanged input (decoding steps) summarise it once.
        plan = make_plan(pattern, replace(env, reuse_tables=True), block)
        if key is not None:
            self._file(key, plan, block)
        return plan

    def put(self, plan: Plan, env: oracle.Env) -> None:
        """File a plan given to a call (`kern(q, k, v, plan=plan)`, checked against the call's `env`)
        for that call's launches: they use its block."""
        key = _plan_key(env)
        if key is not None:
            self._file(key, plan, plan.block)

    def launched(self, env: oracle.Env, block: tuple[int, int]) -> None:
        """Remember the block a launch of these lengths and inputs used."""
        key = _plan_key(env)
        with self._lock:
            entry = self._entries.get(key) if key is not None else None
            if entry is not None and key is not None:
                self._entries[key] = (entry[0], block)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _file(self, key: tuple, plan: Plan, block: tuple[int, int]) -> None:
        with self._lock:
            self._entries[key] = (plan, block)
            self._entries.move_to_end(key)
            while len(self._entries) > PLAN_CACHE_SIZE:
                self._entries.popitem(last=False)


_VISITS: dict[str, torch.Tensor] | None = None


@contextlib.contextmanager
def counting_visits() -> Iterator[dict[str, torch.Tensor]]:
    """Debug (tests, under the interpreter): within the block, every launch counts the tiles its
    kernels visit, and the dict it yields holds the last launch's counts of each kernel: "forward"
    and "dq" int32 [B, H, query tiles, key tiles], "dkv" [B, H, key tiles, query tiles]. A visit adds
    1 when the tile is masked, 16 when it is not: each tile is visited at most once iff every count is
    0, 1 or 16. Not thread-safe; not for timing."""
    global _VISITS
    previous, _VISITS = _VISITS, {}
    try:
        yield _VISITS
    finally:
        _VISITS = previous


def _visits(name: str, shape: tuple[int, ...], device: torch.device, fallback: torch.Tensor) -> torch.Tensor:
    """The counter a launch passes as `Visits`: a zeroed one, filed under `name`, while counting;
    else `fallback` (any tensor: the kernel never reads it)."""
    if _VISITS is None:
        return fallback
    counts = _VISITS[name] = torch.zeros(shape, dtype=torch.int32, device=device)
    return counts


@dataclass
class Forward:
    """A pattern's compiled forward kernel and how to launch it."""

    name: str
    pattern: PatternIR
    spec: KernelSpec
    source: KernelSource

    def __post_init__(self) -> None:
        self._tuners: dict[str, autotune.Tuner] = {}
        self._backward: Backward | None = None
        self.reads_head = any("h" in root.free for root in self.pattern.roots())
        self.plans = PlanCache()
        self.last_config: Config | None = None
        self.last_backend: str | None = None

    @property
    def backward(self) -> Backward:
        """The pattern's backward kernels, compiled (or found in the cache) on first use."""
        if self._backward is None:
            spec = build_backward_spec(self.pattern)
            self._backward = Backward(
                self.name, self.pattern, spec, cache.source(self.pattern, spec, BACKWARD_TEMPLATE), self.plans
            )
        return self._backward

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        env: oracle.Env,
        scale: float,
        options: Sequence[int] | None = None,
        block_table: torch.Tensor | None = None,
        cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_max: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse); `options`: a call's `kernel_options` (`with_options`). With `block_table` (int32
        [B, pages per row]) k and v are a paged cache [pages, page size, Hkv, D] (`Kernel.decode`);
        `env.kv_rows` gives each row's valid keys. With `cu_seqlens` (int32 [B + 1] for q and for k/v)
        q, k and v are packed sequences viewed as [1, H, total rows, D] (`Kernel.varlen`): out is too,
        and lse [1, Hq, total rows]. The launch's sizes come from `env` (for packed sequences the
        longest sequence's lengths). With `return_max`, lse is [2, *lse's shape]: the lse, then each
        query's largest allowed score (natural domain, -inf where it sees no key)."""
        batch, heads, dim = env.batch, q.shape[1], q.shape[3]
        q_len, kv_len, dim_v = env.q_len, env.kv_len, v.shape[3]
        kv_heads = k.shape[2] if block_table is not None else k.shape[1]
        out = empty_like_strides(q, dim_v)
        lse_and_max = torch.empty(
            (2 if return_max else 1, *q.shape[:3]), dtype=torch.float32, device=q.device
        )
        lse = lse_and_max[0]
        if out.numel() == 0 and lse.numel() == 0:
            return out, lse_and_max if return_max else lse
        backend = active()
        shape = LaunchShape(DTYPES[q.dtype], dim, dim_v, heads // kv_heads, q_len, kv_len, batch * heads)
        with _serialised(backend):  # loading too: never while another thread launches
            kernel = module(self.source, backend).attnc_fwd

        def plan_args(config: Config) -> dict[str, Any]:
            if self.spec.analytic:
                return {}
            tiles = self.plans.plan(self.pattern, env, (config.block_m, config.block_n)).kv_tiles
            assert tiles is not None
            return _metadata_args(tiles, "kv")

        maxima = lse_and_max[1] if return_max else lse  # (never written without return_max)
        geometry = geometry_args(env, lse)
        strides, layout = _layout_args(q, k, v, env, lse, block_table, cu_seqlens)
        signature = self.spec.signature
        inputs = _input_args(self.spec.inputs, env, self.pattern)  # (once for every autotuned launch)

        def launch(
            config: Config,
            plan: dict[str, Any],
            out: torch.Tensor,
            lse: torch.Tensor,
            count: bool = False,
            warmup: bool = False,
        ) -> None:
            """One launch; with `warmup`, the kernel's compile for it (`JITFunction.warmup`), not run."""
            pack = pack_gqa(self, shape, config, cu_seqlens is not None, backend, options)
            grid_heads = kv_heads if pack else heads
            n_q, n_kv = (
                -(-q_len * (shape.group if pack else 1) // config.block_m),
                -(-kv_len // config.block_n),
            )
            visits = _visits("forward", (batch, grid_heads, n_q, n_kv), q.device, lse) if count else lse
            splits = kv_splits(self.spec.analytic, batch * grid_heads * n_q, n_kv, q.device, backend, options)
            split_tiles = -(-n_kv // splits)
            parts_out, parts_lse, parts_max = out, lse, maxima
            if splits > 1:  # float32 partial results, one per split, merged below
                parts_out = torch.empty((splits, *out.shape), dtype=torch.float32, device=out.device)
                parts_lse = torch.empty((splits, *lse.shape), dtype=torch.float32, device=out.device)
                parts_max = torch.empty_like(parts_lse) if return_max else parts_lse
            # The output's strides (one part's, for splits; a packed batch row's step 0).
            out_strides = (0 if cu_seqlens is not None else parts_out.stride(-4), *parts_out.stride()[-3:])
            split_strides = (parts_out.stride(0), parts_lse.stride(0)) if splits > 1 else (0, 0)
            grid = (n_q * batch * grid_heads * splits,)
            arguments = signature.arguments(
                tensors=dict(Q=q, K=k, V=v, Out=parts_out, Lse=parts_lse),
                inputs=inputs,
                params=_param_args(self.spec.params, self.pattern, env),
                plan=plan,
                strides=strides,
                output=dict(
                    values(stride_names("o"), out_strides), split_tiles=split_tiles,
                    split_out=split_strides[0], split_lse=split_strides[1], MaxScores=parts_max,
                    PACK_GQA=pack, STORE_MAX=return_max,
                ),
                sizes=dict(
                    BATCH=batch, NUM_HEADS=heads, GQA_GROUP=shape.group, scale=scale,
                    SCALE_NEGATIVE=scale < 0,
                ),
                geometry=geometry,
                visits=dict(Visits=visits, COUNT_VISITS=count and _VISITS is not None),
                config=_constants(config, dim, dim_v, q.dtype, backend),
                layout=layout,
            )  # fmt: skip
            _launcher(kernel, grid, warmup)(**arguments, **_options(config))
            if splits > 1 and not warmup:
                merged_out, merged_lse = merge_splits(parts_out, parts_lse)
                out.copy_(merged_out)
                lse.copy_(merged_lse)
                if return_max:
                    maxima.copy_(parts_max.amax(0))

        def measure(config: Config) -> float:
            """Seconds one launch takes (the plan built before timing)."""
            plan, scratch_out, scratch_lse = plan_args(config), torch.empty_like(out), torch.empty_like(lse)
            return _do_bench(lambda: launch(config, plan, scratch_out, scratch_lse))

        def compile(config: Config) -> None:
            """The compile of the kernel `measure` times, started (`autotune.compile_all`)."""
            launch(config, plan_args(config), out, lse, warmup=True)

        pinned = self.plans.block(env)
        with _on_device(q.device), _serialised(backend):
            config = with_options(
                _config(
                    self._tuners, self.source.key, self.name, backend, q.device, shape, measure,
                    block=pinned, compile=compile,
                ),
                options,
            )  # fmt: skip
            launch(config, plan_args(config), out, lse, count=True)
        if not self.spec.analytic:
            self.plans.launched(env, (config.block_m, config.block_n))
        self.last_config, self.last_backend = config, backend
        return out, lse_and_max if return_max else lse


def _param_args(params: tuple[ParamArg, ...], pattern: PatternIR, env: oracle.Env) -> dict[str, Any]:
    """The runtime parameters' values from `env.params`, by argument: an int as itself, a float as the
    int64 bit pattern of its float64 value (the kernel bitcasts it back; a Python float argument would
    reach the kernel as float32)."""
    args: dict[str, Any] = {}
    for arg in params:
        value = env.params[pattern.params[arg.index].name]
        if arg.type == "float":
            args[arg.arg] = struct.unpack("<q", struct.pack("<d", float(value)))[0]
        else:
            args[arg.arg] = int(value)
    return args


def geometry_args(env: oracle.Env, spare: torch.Tensor) -> dict[str, Any]:
    """The kernels' `Q_ROWS, KV_ROWS, Q_SIZE, KV_SIZE, q_offset, kv_offset, RowOffsets` (the template's
    `geometry`) for `env`, and their constexprs: ROW_OFFSETS, whether q_offset is per batch row (then
    RowOffsets holds the offsets as int32 and Q_SIZE counts the rows alone; else `spare`, a tensor
    never read), and SHIFTED, whether any offset or size of its own is given (else the kernels' shifts
    are the constant 0, and the backward's ranges lie inside the rows)."""
    per_row = isinstance(env.q_offset, torch.Tensor)
    if per_row:
        if env.q_size is not None:
            raise InternalError("a per-row q_offset with an explicit q_size")
        row_offsets = env.q_offset.to(device=spare.device, dtype=torch.int32).contiguous()
        q_offset, q_size = 0, env.q_len
    else:
        row_offsets, q_offset = spare, int(env.q_offset)  # type: ignore[arg-type]
        q_size = env.q_size if env.q_size is not None else env.q_len + q_offset
    kv_size = env.kv_size if env.kv_size is not None else env.kv_len + env.kv_offset
    # Positions other than the rows, or sizes past them (`Kernel.chunk`): the kernels cut ranges to the rows.
    shifted = (
        per_row or q_offset != 0 or env.kv_offset != 0 or env.q_size is not None or env.kv_size is not None
    )
    return dict(
        Q_ROWS=env.q_len, KV_ROWS=env.kv_len, Q_SIZE=q_size, KV_SIZE=kv_size, q_offset=q_offset,
        kv_offset=env.kv_offset, RowOffsets=row_offsets, ROW_OFFSETS=per_row, SHIFTED=shifted,
    )  # fmt: skip


def empty_like_strides(q: torch.Tensor, dim_v: int) -> torch.Tensor:
    """An empty [*q.shape[:3], dim_v] tensor of q's dtype laid out in q's stride order (an output of q's
    [B, L, H, D] layout transposed is such a transpose too, as FlexAttention's is)."""
    order = sorted(range(4), key=lambda d: (-q.stride(d), d))  # outermost dimension first
    sizes = (*q.shape[:3], dim_v)
    out = torch.empty([sizes[d] for d in order], dtype=q.dtype, device=q.device)
    return out.permute([order.index(d) for d in range(4)])


def _layout_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    env: oracle.Env,
    spare: torch.Tensor,
    block_table: torch.Tensor | None,
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[dict[str, int], dict[str, Any]]:
    """How the forward kernel finds its rows (`Forward.run`): q's, k's and v's strides; and the
    arguments `KvRowCounts, BlockTable, stride_table, TABLE_PAGES, NUM_PAGES, CuSeqQ, CuSeqK, TOTAL_Q,
    TOTAL_K` (`spare`, a tensor never read, and zeros where unused) with the constexprs KV_ROW_COUNTS,
    PAGED, PAGE_SIZE, VARLEN."""
    q_strides = list(q.stride())
    kv_strides = [*_kv_strides(k, env.batch), *_kv_strides(v, env.batch)]
    layout: dict[str, Any] = dict(
        KvRowCounts=spare, BlockTable=spare, stride_table=0, TABLE_PAGES=0, NUM_PAGES=1, CuSeqQ=spare,
        CuSeqK=spare, TOTAL_Q=0, TOTAL_K=0, KV_ROW_COUNTS=False, PAGED=False, PAGE_SIZE=1, VARLEN=False,
    )  # fmt: skip
    if cu_seqlens is not None:  # packed: every sequence starts at its row of the one batch row
        q_strides[0] = kv_strides[0] = kv_strides[4] = 0
        layout.update(CuSeqQ=cu_seqlens[0], CuSeqK=cu_seqlens[1], TOTAL_Q=q.shape[2], TOTAL_K=k.shape[2])
        layout["VARLEN"] = True
    elif env.kv_rows is not None:  # decoding: valid key rows per batch row
        layout["KvRowCounts"] = env.kv_rows.to(device=q.device, dtype=torch.int32).contiguous()
        layout["KV_ROW_COUNTS"] = True
    if block_table is not None:
        # [pages, page size, heads, dim]: the kernel's batch stride steps pages, its row stride slots.
        kv_strides = [s for t in (k, v) for s in (t.stride(0), t.stride(2), t.stride(1), t.stride(3))]
        layout.update(
            BlockTable=block_table, stride_table=block_table.stride(0), TABLE_PAGES=block_table.shape[1]
        )
        layout.update(NUM_PAGES=k.shape[0], PAGED=True, PAGE_SIZE=k.shape[1])
    return values(qkv_strides(), [*q_strides, *kv_strides]), layout


def _kv_strides(t: torch.Tensor, batch: int) -> tuple[int, ...]:
    """k's or v's strides for the kernels: a batch of 1 broadcast over q's `batch` rows steps 0."""
    return (0, *t.stride()[1:]) if t.shape[0] == 1 and batch != 1 else tuple(t.stride())


def _input_args(inputs: tuple[InputArg, ...], env: oracle.Env, pattern: PatternIR) -> dict[str, Any]:
    """The input tensors' arguments (`InputArg`): each one's pointer, dims and strides. Along an axis
    declared BATCH or KV_LEN (`InputArg.covers`) an input must cover what the kernels read there
    without a bound test: every batch row, and the key positions up to the last row's. The calls'
    shape checks ensure it; a launch that bypasses them (the custom op called directly) gets an
    InputError here, never a read past the input."""
    needed = {"BATCH": env.batch, "KV_LEN": env.kv_len + env.kv_offset}
    args: dict[str, Any] = {}
    for arg in inputs:
        tensor = env.inputs[arg.name]
        for axis, size in enumerate(arg.covers):
            if size is not None and tensor.shape[axis] < needed[size]:
                decl = pattern.input(arg.name)
                raise InputError(
                    f"input '{arg.name}' has size {tensor.shape[axis]} along axis {axis}, declared "
                    f"{size}: the kernels read it there without a bound test at indices up to "
                    f"{needed[size] - 1}, so it needs at least {needed[size]} (shape {list(tensor.shape)})",
                    None if decl is None else decl.loc,
                )
        if arg.bits:
            words, count, word_strides = arg.bit_args
            packed = pack_bits(tensor)
            args[words], args[count] = packed, packed.shape[-1]
            args.update(values(word_strides, packed.stride()))
        if tensor.dtype == torch.bool:
            tensor = tensor.view(torch.uint8)
        args[arg.ptr] = tensor
        args.update(values(arg.scalars, (*tensor.shape, *tensor.stride())))
    return args


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A bool tensor's values packed along its last axis, 32 to an int32 word (`spec.InputArg.bits`):
    bit i of word j is the element at position 32 j + i, and the bits past the axis' end are 0. (Each
    word is a sum of distinct bit values, bit 31's negative: exact in int32.)"""
    # Nonzero is true, as the kernels read the bytes: a bool tensor's raw bytes too (one holding 2 is
    # no 0 / 1 that a conversion to int32 could be trusted to make 1).
    flags = (flags.view(torch.uint8) if flags.dtype == torch.bool else flags) != 0
    *lead, length = flags.shape
    words = -(-length // WORD_BITS)
    padded = torch.zeros((*lead, words * WORD_BITS), dtype=torch.int32, device=flags.device)
    padded[..., :length] = flags
    return (padded.view(*lead, words, WORD_BITS) * _bit_values(flags.device)).sum(-1, dtype=torch.int32)


_BIT_VALUES: dict[torch.device, torch.Tensor] = {}


def _bit_values(device: torch.device) -> torch.Tensor:
    """Bit i's value in an int32 word, [32]: 2 ** i, bit 31's negative. Made on the device (no copy
    from the host, which a CUDA graph could not capture), once per device outside a capture (a
    tensor made while a graph captures belongs to the graph's memory, not kept)."""
    if device in _BIT_VALUES:
        return _BIT_VALUES[device]
    values = torch.ones(WORD_BITS, dtype=torch.int64, device=device) << torch.arange(WORD_BITS, device=device)
    values = torch.where(values >= 1 << (WORD_BITS - 1), values - (1 << WORD_BITS), values).to(torch.int32)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _BIT_VALUES[device] = values
    return values


def with_options(config: Config, options: Sequence[int] | None) -> Config:
    """`config` with the fields a call's `kernel_options` give: [BLOCK_M, BLOCK_N, num_warps, num_stages,
    SPLIT_KV], 0 for a field not given (`Kernel.__call__` checked them). They take precedence over
    `ATTNC_CONFIG`, the autotuner and the heuristics, and over a plan's block (the plan is derived for
    the new one). SPLIT_KV is `kv_splits`'."""
    if not options:
        return config
    given = [value or default for value, default in zip(options[:4], astuple(config), strict=True)]
    return Config(*given)


def pack_gqa(
    forward: Forward,
    shape: LaunchShape,
    config: Config,
    varlen: bool,
    backend: str,
    options: Sequence[int] | None,
) -> bool:
    """Whether the forward packs the query heads of each key/value head into its tiles (the kernel's
    PACK_GQA), so that short queries (decoding) fill the tile and each key tile is read once per group,
    not once per query head: the `PACK_GQA` kernel option where given (1 or 0); else on a GPU for
    grouped heads whose queries fill at most half a tile. Never for packed sequences, metadata plans or
    patterns that read `h` (a tile's rows would then differ in more than their positions)."""
    if shape.group == 1 or varlen or not forward.spec.analytic or forward.reads_head:
        return False
    if options and len(options) > 5 and options[5]:
        return options[5] == 1
    if backend == INTERPRETER:
        return False
    return 2 * shape.q_len <= config.block_m


MAX_KV_SPLITS = 64
"""The most key splits `kv_splits` chooses (a `SPLIT_KV` kernel option may ask for more)."""


def kv_splits(
    analytic: bool,
    programs: int,
    key_tiles: int,
    device: torch.device,
    backend: str,
    options: Sequence[int] | None,
) -> int:
    """How many parts the key tiles of each query tile are split into (flash-decoding), each computed
    by its own program and merged by lse (`merge_splits`): the `SPLIT_KV` kernel option where given;
    else, on a GPU, enough to give every multiprocessor two programs when the (batch row, head, query
    tile) programs alone cannot (short queries: decoding), with at least 4 key tiles per part and at
    most `MAX_KV_SPLITS` parts; 1 under the interpreter, and for metadata plans (whose loops do not
    split)."""
    if not analytic or key_tiles <= 1:
        return 1
    if options and len(options) > 4 and options[4]:
        return max(1, min(options[4], key_tiles))
    if backend == INTERPRETER or device.type != "cuda":
        return 1
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= processors:
        return 1
    wanted = -(-2 * processors // max(programs, 1))
    return max(1, min(wanted, key_tiles // 4, MAX_KV_SPLITS))


def merge_splits(parts_out: torch.Tensor, parts_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and lse of the whole keys from those of key splits [splits, ...] (each normalised
    over its own keys): lse = logsumexp of the parts', out = the parts' outputs weighted by exp(lse_part
    - lse). A query no key of any split may see keeps output 0 and lse -inf."""
    lse = torch.logsumexp(parts_lse, dim=0)
    weights = torch.exp(parts_lse - lse.unsqueeze(0)).nan_to_num(0.0)  # -inf - -inf: no keys at all
    return (weights.unsqueeze(-1) * parts_out).sum(0), lse


def _config(
    tuners: dict[str, autotune.Tuner],
    key: str,
    label: str,
    backend: str,
    device: torch.device,
    shape: LaunchShape,
    measure: Callable[[Config], float],
    backward: bool = False,
    block: tuple[int, int] | None = None,
    dkv: bool = False,
    compile: Callable[[Config], None] | None = None,
    conjuncts: int = 1,
) -> Config:
    """The launch configuration: forced (`ATTNC_CONFIG`), the interpreter's, the heuristic's or the
    autotuner's. `block`: the block of the plan on file (`PlanCache`), chosen among the configurations
    of that (BLOCK_M, BLOCK_N) where some fit the device (else freely: the plan then derives metadata
    for the chosen block, once). `backward`: the dQ kernel's, `dkv`: the dK/dV kernel's (a forced
    configuration, and the interpreter's, serve both). `compile`: warms a configuration's kernels up
    without launching them (the autotuner compiles the candidates in parallel before timing them,
    `autotune.compile_all`). `conjuncts`: the analytic plan's (`autotune.heuristic`)."""
    forced = autotune.forced()
    tuning = autotune.autotuning_enabled()  # read on every backend, so that a bad value is never ignored
    if forced is not None:
        return forced
    if backend == INTERPRETER:
        if block is not None and Config(*block, 1, 1).problem() is None:
            return Config(*block, 1, 1)
        return autotune.INTERPRETER_CONFIG
    device_name, shared, arch = _device_limits(
        device.index if device.index is not None else torch.cuda.current_device()
    )
    first_choice = {"conjuncts": conjuncts, "arch": arch}  # what the heuristic's choice depends on too
    pool = (
        autotune.candidates(shape, shared, backward, dkv, block, **first_choice) if block is not None else []
    )
    if pool:
        chosen = autotune.heuristic(shape, shared, backward, dkv, **first_choice)
        if not tuning:
            return chosen if chosen in pool else pool[0]
        tuner = tuners.get(device_name)
        known = tuner.known(shape) if tuner is not None else None
        if known is not None and known in pool:
            return known
        # Tuned among this block's configurations, in memory only (the saved choice is the free one).
        pinned_key = (key, device_name, shape.bucket(), block, backward, dkv)
        if pinned_key not in _PINNED:
            if compile is not None:
                autotune.compile_all(pool, compile)
            _PINNED[pinned_key] = min(pool, key=lambda config: _seconds_or_inf(measure, config))
        return _PINNED[pinned_key]
    if not tuning:
        return autotune.heuristic(shape, shared, backward, dkv, **first_choice)
    tuner = tuners.get(device_name)
    if tuner is None:
        tuner = tuners[device_name] = autotune.Tuner(key, device_name)
    return tuner.tune(
        shape,
        autotune.candidates(shape, shared, backward, dkv, **first_choice),
        measure,
        label,
        compile=compile,
    )


_PINNED: dict[tuple, Config] = {}


def _seconds_or_inf(measure: Callable[[Config], float], config: Config) -> float:
    """`measure(config)`, or infinity where the configuration needs more than the device has."""
    from triton.runtime.errors import OutOfResources

    try:
        return measure(config)
    except OutOfResources:
        return float("inf")


def _constants(config: Config, dim: int, dim_v: int, dtype: torch.dtype, backend: str) -> dict[str, Any]:
    """The compile-time arguments the forward and backward kernels share (their "config" source)."""
    ptx = backend == CUDA and torch.version.hip is None  # NVIDIA: not ROCm, not the interpreter
    return dict(
        HEAD_DIM=dim,
        HEAD_DIM_V=dim_v,
        D_PAD=autotune.padded(dim),
        DV_PAD=autotune.padded(dim_v),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION=dot_precision(dtype, backend),
        # Triton's interpreter cannot multiply bfloat16 matrices (see the template's UPCAST_DOT).
        UPCAST_DOT=backend == INTERPRETER and dtype == torch.bfloat16,
        # Hardware approximations (tanh.approx.f32, inline PTX) where 16-bit inputs leave room for
        # their error: NVIDIA only; float32 keeps the exact formulas.
        FAST_MATH=ptx and dtype in (torch.bfloat16, torch.float16),
        PTX=ptx,  # inline PTX that changes no value (`_opaque`)
    )


def _options(config: Config) -> dict[str, int]:
    """A configuration's launch options (not kernel arguments)."""
    return dict(num_warps=config.num_warps, num_stages=config.num_stages)


def dot_precision(dtype: torch.dtype, backend: str) -> str:
    """How the kernels multiply float32 tiles: as PyTorch's matmuls do. IEEE float32 by default;
    TF32 (faster, about 10 mantissa bits) once the user allows it with
    `torch.set_float32_matmul_precision("high")` or `"medium"`. Under the interpreter (which also
    holds bfloat16 tiles in float32) always IEEE."""
    if backend == INTERPRETER:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"  # 16-bit tiles multiply at the MMA's own precision: the argument does not apply
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1 while cuda:0 is
    current must not run on cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_INTERPRETER_LOCK = threading.RLock()


def _serialised(backend: str) -> contextlib.AbstractContextManager:
    """Triton's interpreter is not thread-safe (a launch patches `triton.language` process-wide, sets
    a global grid index, and restores both after): under it, one launch at a time. GPU launches are
    not serialised."""
    return _INTERPRETER_LOCK if backend == INTERPRETER else contextlib.nullcontext()


def _do_bench(fn: Callable[[], None]) -> float:
    """Seconds one call takes on the GPU."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20) / 1e3


@dataclass
class Backward:
    """A pattern's compiled backward kernels and how to launch them."""

    name: str
    pattern: PatternIR
    spec: BackwardSpec
    source: KernelSource
    plans: PlanCache  # the forward's: the backward reuses its plan

    def __post_init__(self) -> None:
        self._tuners: dict[str, autotune.Tuner] = {}  # the dQ kernel's configurations, by device
        self._dkv_tuners: dict[str, autotune.Tuner] = {}  # the dK/dV kernel's
        self.last_config: Config | None = None  # the last launch's dQ configuration
        self.last_dkv_config: Config | None = None  # and its dK/dV one

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        dlse: torch.Tensor | None,
        env: oracle.Env,
        scale: float,
        wanted: tuple[str, ...],
        options: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(dq, dk, dv, gradients of the `wanted` inputs, by name, in their own dtypes) for the loss
        gradients `dout` of the output and `dlse` of the lse (None: the lse was not used); `options` as
        for the forward."""
        batch, heads, q_len, dim = q.shape
        kv_len, dim_v = k.shape[2], v.shape[3]
        grad_args = {a.name: a for a in self.spec.grad_inputs}
        for name in wanted:
            if name not in grad_args:
                raise InternalError(f"input '{name}' has no gradient")
        grads = {
            a.name: torch.zeros(env.inputs[a.name].shape, dtype=torch.float64, device=q.device)
            for a in self.spec.grad_inputs
            if a.name in wanted
        }
        if q_len == 0 or kv_len == 0 or batch * heads == 0:
            return (
                torch.zeros_like(q),
                torch.zeros_like(k),
                torch.zeros_like(v),
                {n: g.to(env.inputs[n].dtype) for n, g in grads.items()},
            )
        backend = active()
        with _serialised(backend):
            module_ = module(self.source, backend)
        shape = LaunchShape(DTYPES[q.dtype], dim, dim_v, heads // k.shape[1], q_len, kv_len, batch * heads)
        lse = lse.contiguous()

        # In half precision the stored O is rounded; an input's gradient sums dZ over whole rows, where
        # rowsum(dO * O)'s rounding does not cancel. The dQ kernel then computes Delta from P and dP.
        exact_delta = q.dtype != torch.float32 and bool(grads)

        def delta_of(config: Config, warmup: bool = False) -> torch.Tensor:
            """Delta for `config`'s launch; with `warmup`, its kernel's compile, and a tensor to stand
            for it (unset)."""
            if exact_delta:  # the dQ kernel adds rowsum(P * dP) to this
                return -dlse.float().contiguous() if dlse is not None else torch.zeros_like(lse)
            delta = torch.empty_like(lse)
            grid = (-(-q_len // config.block_m) * batch * heads,)
            arguments = self.spec.signatures[0].arguments(
                tensors=dict(Out=out, dOut=dout, Delta=delta),
                strides=values((*stride_names("o"), *stride_names("do")), (*out.stride(), *dout.stride())),
                sizes=dict(NUM_HEADS=heads, Q_ROWS=q_len),
                config=dict(HEAD_DIM_V=dim_v, DV_PAD=autotune.padded(dim_v), BLOCK_M=config.block_m),
            )
            _launcher(module_.attnc_bwd_preprocess, grid, warmup)(**arguments)
            if dlse is not None and not warmup:  # d lse / d score = P: the lse's gradient joins Delta's
                delta -= dlse.to(torch.float32)
            return delta

        inputs = _input_args(self.spec.inputs, env, self.pattern)  # (once for both kernels)

        def plan_args(config: Config, dkv: bool) -> dict[str, Any]:
            """The metadata plan's arguments of one kernel: key tiles per query tile (dQ) or query tiles
            per key tile (dK/dV), for the kernel's own block."""
            if self.spec.analytic:
                return {}
            plan = self.plans.plan(self.pattern, env, (config.block_m, config.block_n))
            tiles = plan.q_tiles if dkv else plan.kv_tiles
            assert tiles is not None
            return _metadata_args(tiles, "q" if dkv else "kv")

        def sources(
            config: Config,
            grad_buffers: dict[str, torch.Tensor],
            delta: torch.Tensor,
            counting: bool,
            visits: torch.Tensor,
            outputs: dict[str, torch.Tensor],
        ) -> dict[str, dict[str, Any]]:
            """The values, by source, of either kernel, whose `outputs` are dQ or dK and dV (for the
            strides: `stride_dqb`, ...)."""
            grads: dict[str, Any] = {}
            for a in self.spec.grad_inputs:
                buffer = grad_buffers.get(a.name)
                if buffer is None:  # not wanted: the kernel never touches it
                    buffer = torch.zeros((), dtype=torch.float32, device=q.device).expand(
                        env.inputs[a.name].shape
                    )
                grads[a.grad_ptr] = buffer
                grads.update(values(a.grad_strides, buffer.stride()))
                grads[a.grad_flag] = a.name in grad_buffers
            given = [*q.stride(), *_kv_strides(k, batch), *_kv_strides(v, batch), *dout.stride()]
            given += [s for output in outputs.values() for s in output.stride()]
            strides = values(backward_strides(*(name.lower() for name in outputs)), given)
            return dict(
                tensors=dict(Q=q, K=k, V=v, dOut=dout, Lse=lse, Delta=delta, **outputs),
                inputs=inputs,
                grads=grads,
                params=_param_args(self.spec.params, self.pattern, env),
                strides=strides,
                sizes=dict(BATCH=batch, NUM_HEADS=heads, GQA_GROUP=shape.group, scale=scale),
                geometry=geometry_args(env, delta),
                visits=dict(Visits=visits, COUNT_VISITS=counting),
                config=_constants(config, dim, dim_v, q.dtype, backend),
            )

        def tiles_of(config: Config) -> tuple[int, int, int, int]:
            return batch, heads, -(-q_len // config.block_m), -(-kv_len // config.block_n)

        def launch_dq(
            config: Config,
            plan: dict[str, Any],
            delta: torch.Tensor,
            result,
            count: bool = False,
            warmup: bool = False,
        ) -> None:
            """The dQ kernel's launch; with `warmup`, its compile for it, not run."""
            dq, _, _, grad_buffers = result
            counting = count and _VISITS is not None
            visits = _visits("dq", tiles_of(config), q.device, delta) if counting else delta
            grid = (-(-q_len // config.block_m) * batch * heads,)
            given = sources(config, grad_buffers, delta, counting, visits, dict(dQ=dq))
            arguments = self.spec.signatures[1].arguments(
                **given, plan=plan, delta=dict(EXACT_DELTA=exact_delta)
            )
            _launcher(module_.attnc_bwd_dq, grid, warmup)(**arguments, **_options(config))

        def launch_dkv(
            config: Config,
            plan: dict[str, Any],
            delta: torch.Tensor,
            result,
            count: bool = False,
            warmup: bool = False,
        ) -> None:
            """The dK/dV kernel's launch; with `warmup`, its compile for it, not run."""
            _, dk, dv, grad_buffers = result
            counting = count and _VISITS is not None
            b, h, m, n = tiles_of(config)
            visits = _visits("dkv", (b, h, n, m), q.device, delta) if counting else delta
            grid = (-(-kv_len // config.block_n) * batch * k.shape[1],)
            given = sources(config, grad_buffers, delta, counting, visits, dict(dK=dk, dV=dv))
            arguments = self.spec.signatures[2].arguments(**given, plan=plan)
            _launcher(module_.attnc_bwd_dkv, grid, warmup)(**arguments, **_options(config))

        # k and v broadcast over q's batch (batch size 1): each batch row's dK/dV go to a float32 buffer
        # of their own, summed after the launch.
        broadcast = k.shape[0] != batch

        def new_result(grad_buffers: dict[str, torch.Tensor]):
            if broadcast:
                dk, dv = (
                    torch.empty((batch, *t.shape[1:]), dtype=torch.float32, device=t.device) for t in (k, v)
                )
                return torch.empty_like(q), dk, dv, grad_buffers
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_buffers

        # Each kernel is timed alone, with its own configurations (dK/dV reads a Delta that only
        # EXACT_DELTA's dQ kernel would complete: its values do not change the time).
        def measure_dq(config: Config) -> float:
            plan, delta = plan_args(config, False), delta_of(config)
            scratch = new_result({n: torch.zeros_like(g) for n, g in grads.items()})
            return _do_bench(lambda: launch_dq(config, plan, delta, scratch))

        def measure_dkv(config: Config) -> float:
            plan, delta = plan_args(config, True), delta_of(config)
            scratch = new_result({n: torch.zeros_like(g) for n, g in grads.items()})
            return _do_bench(lambda: launch_dkv(config, plan, delta, scratch))

        # The compiles of the kernels `measure_dq` and `measure_dkv` time, started (`autotune.compile_all`):
        # their buffers are the measures', unwritten (with the preprocess each measure launches).
        def compile_dq(config: Config) -> None:
            delta = delta_of(config, warmup=True)
            launch_dq(config, plan_args(config, False), delta, new_result(grads), warmup=True)

        def compile_dkv(config: Config) -> None:
            delta = delta_of(config, warmup=True)  # `measure_dkv` computes one for its block too
            launch_dkv(config, plan_args(config, True), delta, new_result(grads), warmup=True)

        # The forward's plan (on file with the block it ran with) serves the backward where the backward
        # can run with that block. dQ and dK/dV each have their own configuration (`autotune`; a forced
        # one, kernel options and the interpreter's serve both).
        pinned = self.plans.block(env)
        with _on_device(q.device), _serialised(backend):
            dq_config = with_options(_config(
                self._tuners, self.source.key, f"{self.name} backward (dQ)", backend, q.device, shape,
                measure_dq, backward=True, block=pinned, compile=compile_dq,
            ), options)  # fmt: skip
            dkv_config = with_options(_config(
                self._dkv_tuners, f"{self.source.key}-dkv", f"{self.name} backward (dK/dV)", backend,
                q.device, shape, measure_dkv, backward=True, block=pinned, dkv=True, compile=compile_dkv,
                conjuncts=autotune.kernel_conjuncts(self.spec.q_ranges),
            ), options)  # fmt: skip
            result = new_result(grads)
            delta = delta_of(dq_config)
            launch_dq(dq_config, plan_args(dq_config, False), delta, result, count=True)
            launch_dkv(dkv_config, plan_args(dkv_config, True), delta, result, count=True)
        self.last_config, self.last_dkv_config = dq_config, dkv_config
        dq, dk, dv, _ = result
        if broadcast:
            dk, dv = dk.sum(0, keepdim=True).to(k.dtype), dv.sum(0, keepdim=True).to(v.dtype)
        return dq, dk, dv, {n: g.to(env.inputs[n].dtype) for n, g in grads.items()}


def _launcher(kernel: Any, grid: tuple[int, ...], warmup: bool) -> Callable[..., Any]:
    """`kernel[grid]`, or with `warmup` its compile for that launch (`JITFunction.warmup`), not run:
    what the autotuner's parallel compiles (`autotune.compile_all`) call with a launch's arguments."""
    return functools.partial(kernel.warmup, grid=grid) if warmup else kernel[grid]


def _metadata_args(tiles: BlockSparse, prefix: str) -> dict[str, Any]:
    """A `BlockSparse` as kernel arguments, its lists named `{prefix}_partial_counts`, ... (kv: key tiles
    per query tile, q: query tiles per key tile); a launch has at least one tile along each axis, so
    every row the kernels read has an entry."""
    return {
        f"{prefix}_partial_counts": tiles.partial_counts,
        f"{prefix}_partial_indices": tiles.partial_indices,
        f"{prefix}_full_counts": tiles.full_counts,
        f"{prefix}_full_indices": tiles.full_indices,
        "META_HEADS": tiles.heads,
    }
