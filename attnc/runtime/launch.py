"""Running a pattern's kernels: backend, configuration, plan, arguments and grid.

`Forward.run` is what `Kernel.__call__` does once its arguments are checked (through the custom op of
`runtime/autograd.py`), and `Backward.run` what its gradient does. Kernel argument lists are built
here in the order of the templates' signatures (`codegen/templates/attention_{fwd,bwd}.py.jinja`).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from attnc import oracle
from attnc.codegen.lower import build_backward_spec
from attnc.codegen.spec import BackwardSpec, InputArg, KernelSpec, ParamArg
from attnc.errors import InternalError
from attnc.ir.nodes import PatternIR
from attnc.runtime import autotune, cache
from attnc.runtime.autotune import Config, LaunchShape
from attnc.runtime.backend import INTERPRETER, active
from attnc.runtime.cache import KernelSource, module
from attnc.runtime.plan import BlockSparse, Plan, make_plan

BACKWARD_TEMPLATE = "attention_bwd.py.jinja"
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=16)
def _device_limits(index: int) -> tuple[str, int]:
    """A CUDA device's name and shared memory per block (opt-in maximum), in bytes."""
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 0
    if not shared:
        import triton

        shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return f"{props.name} sm{props.major}{props.minor}", int(shared)


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
    return env.q_len, env.kv_len, env.batch, env.num_heads, str(env.device), params, tuple(inputs)


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
        plan = make_plan(pattern, env, block)
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
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, env: oracle.Env, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, q_len, dim = q.shape
        kv_len, dim_v = k.shape[2], v.shape[3]
        out = torch.empty((batch, heads, q_len, dim_v), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
        if out.numel() == 0 and lse.numel() == 0:
            return out, lse
        backend = active()
        shape = LaunchShape(DTYPES[q.dtype], dim, dim_v, heads // k.shape[1], q_len, kv_len, batch * heads)
        with _serialised(backend):  # loading too: never while another thread launches
            kernel = module(self.source, backend).attnc_fwd

        def plan_args(config: Config) -> list[Any]:
            if self.spec.analytic:
                return []
            tiles = self.plans.plan(self.pattern, env, (config.block_m, config.block_n)).kv_tiles
            assert tiles is not None
            return _metadata_args(tiles)

        def launch(
            config: Config, plan: list[Any], out: torch.Tensor, lse: torch.Tensor, count: bool = False
        ) -> None:
            tiles = (batch, heads, -(-q_len // config.block_m), -(-kv_len // config.block_n))
            visits = _visits("forward", tiles, q.device, lse) if count else lse
            grid = (-(-q_len // config.block_m) * batch * heads,)
            kernel[grid](
                q, k, v, out, lse,
                *_input_args(self.spec.inputs, env),
                *_param_args(self.spec.params, self.pattern, env),
                *plan,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                batch, heads, q_len, kv_len, shape.group, scale, visits,
                **_constants(config, dim, dim_v, q.dtype, backend, count and _VISITS is not None),
            )  # fmt: skip

        def measure(config: Config) -> float:
            """Seconds one launch takes (the plan built before timing)."""
            plan, scratch_out, scratch_lse = plan_args(config), torch.empty_like(out), torch.empty_like(lse)
            return _do_bench(lambda: launch(config, plan, scratch_out, scratch_lse))

        pinned = self.plans.block(env)
        with _on_device(q.device), _serialised(backend):
            config = _config(
                self._tuners, self.source.key, self.name, backend, q.device, shape, measure, block=pinned
            )
            launch(config, plan_args(config), out, lse, count=True)
        if not self.spec.analytic:
            self.plans.launched(env, (config.block_m, config.block_n))
        self.last_config, self.last_backend = config, backend
        return out, lse


def _param_args(params: tuple[ParamArg, ...], pattern: PatternIR, env: oracle.Env) -> list[Any]:
    """The runtime parameters' values from `env.params`, in the spec's order: an int as itself, a
    float as the int64 bit pattern of its float64 value (the kernel bitcasts it back; a Python float
    argument would reach the kernel as float32)."""
    args: list[Any] = []
    for arg in params:
        value = env.params[pattern.params[arg.index].name]
        if arg.type == "float":
            args.append(struct.unpack("<q", struct.pack("<d", float(value)))[0])
        else:
            args.append(int(value))
    return args


def _input_args(inputs: tuple[InputArg, ...], env: oracle.Env) -> list[Any]:
    args: list[Any] = []
    for arg in inputs:
        tensor = env.inputs[arg.name]
        if tensor.dtype == torch.bool:
            tensor = tensor.view(torch.uint8)
        args += [tensor, *tensor.shape, *tensor.stride()]
    return args


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
) -> Config:
    """The launch configuration: forced (`ATTNC_CONFIG`), the interpreter's, the heuristic's or the
    autotuner's. `block`: the block of the plan on file (`PlanCache`), chosen among the configurations
    of that (BLOCK_M, BLOCK_N) where some fit the device (else freely: the plan then derives metadata
    for the chosen block, once)."""
    forced = autotune.forced()
    tuning = autotune.autotuning_enabled()  # read on every backend, so that a bad value is never ignored
    if forced is not None:
        return forced
    if backend == INTERPRETER:
        if block is not None and Config(*block, 1, 1).problem() is None:
            return Config(*block, 1, 1)
        return autotune.INTERPRETER_CONFIG
    device_name, shared = _device_limits(
        device.index if device.index is not None else torch.cuda.current_device()
    )
    pool = [c for c in autotune.candidates(shape, shared, backward) if block == (c.block_m, c.block_n)]
    if pool:
        chosen = autotune.heuristic(shape, shared, backward)
        if not tuning:
            return chosen if chosen in pool else pool[0]
        tuner = tuners.get(device_name)
        known = tuner.known(shape) if tuner is not None else None
        if known is not None and known in pool:
            return known
        # Tuned among this block's configurations, in memory only (the saved choice is the free one).
        pinned_key = (key, device_name, shape.bucket(), block, backward)
        if pinned_key not in _PINNED:
            _PINNED[pinned_key] = min(pool, key=lambda config: _seconds_or_inf(measure, config))
        return _PINNED[pinned_key]
    if not tuning:
        return autotune.heuristic(shape, shared, backward)
    tuner = tuners.get(device_name)
    if tuner is None:
        tuner = tuners[device_name] = autotune.Tuner(key, device_name)
    return tuner.tune(shape, autotune.candidates(shape, shared, backward), measure, label)


_PINNED: dict[tuple, Config] = {}


def _seconds_or_inf(measure: Callable[[Config], float], config: Config) -> float:
    """`measure(config)`, or infinity where the configuration needs more than the device has."""
    from triton.runtime.errors import OutOfResources

    try:
        return measure(config)
    except OutOfResources:
        return float("inf")


def _constants(
    config: Config, dim: int, dim_v: int, dtype: torch.dtype, backend: str, count: bool = False
) -> dict[str, Any]:
    """The compile-time arguments and launch options the forward and backward kernels share (`count`:
    whether they count their tile visits, `counting_visits`)."""
    return dict(
        COUNT_VISITS=count,
        HEAD_DIM=dim,
        HEAD_DIM_V=dim_v,
        D_PAD=autotune.padded(dim),
        DV_PAD=autotune.padded(dim_v),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION=dot_precision(dtype, backend),
        # Triton's interpreter cannot multiply bfloat16 matrices (see the template's UPCAST_DOT).
        UPCAST_DOT=backend == INTERPRETER and dtype == torch.bfloat16,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


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
        self._tuners: dict[str, autotune.Tuner] = {}
        self.last_config: Config | None = None

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(dq, dk, dv, gradients of the `wanted` inputs, by name, in their own dtypes) for the loss
        gradients `dout` of the output and `dlse` of the lse (None: the lse was not used)."""
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

        def delta_of(config: Config) -> torch.Tensor:
            if exact_delta:  # the dQ kernel adds rowsum(P * dP) to this
                return -dlse.float().contiguous() if dlse is not None else torch.zeros_like(lse)
            delta = torch.empty_like(lse)
            grid = (-(-q_len // config.block_m) * batch * heads,)
            module_.attnc_bwd_preprocess[grid](
                out, dout, delta, *out.stride(), *dout.stride(), heads, q_len,
                HEAD_DIM_V=dim_v, DV_PAD=autotune.padded(dim_v), BLOCK_M=config.block_m,
            )  # fmt: skip
            if dlse is not None:  # d lse / d score = P: the lse's gradient joins Delta's
                delta -= dlse.to(torch.float32)
            return delta

        def plan_args(config: Config) -> tuple[list[Any], list[Any]]:
            if self.spec.analytic:
                return [], []
            plan = self.plans.plan(self.pattern, env, (config.block_m, config.block_n))
            assert plan.kv_tiles is not None and plan.q_tiles is not None
            return _metadata_args(plan.kv_tiles), _metadata_args(plan.q_tiles)

        def launch(
            config: Config,
            plans: tuple[list[Any], list[Any]],
            delta: torch.Tensor,
            result,
            count: bool = False,
        ) -> None:
            dq, dk, dv, grad_buffers = result
            counting = count and _VISITS is not None
            common = _constants(config, dim, dim_v, q.dtype, backend, counting)
            tiles = (batch, heads, -(-q_len // config.block_m), -(-kv_len // config.block_n))
            dq_visits = _visits("dq", tiles, q.device, delta) if counting else delta
            dkv_visits = (
                _visits("dkv", (*tiles[:2], tiles[3], tiles[2]), q.device, delta) if counting else delta
            )
            common.update({a.grad_flag: a.name in grad_buffers for a in self.spec.grad_inputs})
            inputs = _input_args(self.spec.inputs, env)
            for a in self.spec.grad_inputs:
                buffer = grad_buffers.get(a.name)
                if buffer is None:  # not wanted: the kernel never touches it
                    buffer = torch.zeros((), dtype=torch.float32, device=q.device).expand(
                        env.inputs[a.name].shape
                    )
                inputs += [buffer, *buffer.stride()]
            inputs += _param_args(self.spec.params, self.pattern, env)
            sizes = (batch, heads, q_len, kv_len, shape.group, scale)
            strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
            grid = (-(-q_len // config.block_m) * batch * heads,)
            module_.attnc_bwd_dq[grid](
                q, k, v, dout, lse, delta, dq, *inputs, *plans[0], *strides, *dq.stride(), *sizes, dq_visits,
                **common,
                EXACT_DELTA=exact_delta,
            )  # fmt: skip
            grid = (-(-kv_len // config.block_n) * batch * k.shape[1],)
            module_.attnc_bwd_dkv[grid](
                q, k, v, dout, lse, delta, dk, dv, *inputs, *plans[1], *strides, *dk.stride(), *dv.stride(),
                *sizes, dkv_visits, **common,
            )  # fmt: skip

        def new_result(grad_buffers: dict[str, torch.Tensor]):
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_buffers

        def measure(config: Config) -> float:
            plans, delta = plan_args(config), delta_of(config)
            scratch = new_result({n: torch.zeros_like(g) for n, g in grads.items()})
            return _do_bench(lambda: launch(config, plans, delta, scratch))

        # The forward's plan (on file with the block it ran with) serves the backward where the backward
        # can run with that block.
        pinned = self.plans.block(env)
        with _on_device(q.device), _serialised(backend):
            config = _config(
                self._tuners, self.source.key, f"{self.name} backward", backend, q.device, shape, measure,
                backward=True, block=pinned,
            )  # fmt: skip
            result = new_result(grads)
            launch(config, plan_args(config), delta_of(config), result, count=True)
        self.last_config = config
        dq, dk, dv, _ = result
        return dq, dk, dv, {n: g.to(env.inputs[n].dtype) for n, g in grads.items()}


def _metadata_args(tiles: BlockSparse) -> list[Any]:
    """A `BlockSparse` as kernel arguments (a launch has at least one tile along each axis, so every
    row the kernels read has an entry)."""
    return [tiles.partial_counts, tiles.partial_indices, tiles.full_counts, tiles.full_indices, tiles.heads]
