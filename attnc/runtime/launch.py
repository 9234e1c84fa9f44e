"""Running a pattern's kernels: backend, configuration, plan, arguments and grid.

`Forward.run` is what `Kernel.__call__` does once its arguments are checked (through the custom op of
`runtime/autograd.py`), and `Backward.run` what its gradient does. Kernel argument lists are built
here in the order of the templates' signatures (`codegen/templates/attention_{fwd,bwd}.py.jinja`).
Analytic patterns launch with no plan at all (the kernels derive their own loop bounds); the others
get block-sparse metadata built for the launch's tile size on the tensors' device.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import threading
from collections.abc import Callable
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
from attnc.runtime.plan import make_plan

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
        self.last_config: Config | None = None
        self.last_backend: str | None = None

    @property
    def backward(self) -> Backward:
        """The pattern's backward kernels, compiled (or found in the cache) on first use."""
        if self._backward is None:
            spec = build_backward_spec(self.pattern)
            self._backward = Backward(
                self.name, self.pattern, spec, cache.source(self.pattern, spec, BACKWARD_TEMPLATE)
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
            tiles = make_plan(self.pattern, env, (config.block_m, config.block_n)).kv_tiles
            assert tiles is not None
            return _metadata_args(tiles)

        def launch(config: Config, plan: list[Any], out: torch.Tensor, lse: torch.Tensor) -> None:
            grid = (-(-q_len // config.block_m) * batch * heads,)
            kernel[grid](
                q, k, v, out, lse,
                *_input_args(self.spec.inputs, env),
                *_param_args(self.spec.params, self.pattern, env),
                *plan,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                batch, heads, q_len, kv_len, shape.group, scale,
                **_constants(config, dim, dim_v, q.dtype, backend),
            )  # fmt: skip

        def measure(config: Config) -> float:
            """Seconds one launch takes (the plan built before timing)."""
            plan, scratch_out, scratch_lse = plan_args(config), torch.empty_like(out), torch.empty_like(lse)
            return _do_bench(lambda: launch(config, plan, scratch_out, scratch_lse))

        with _on_device(q.device), _serialised(backend):
            config = _config(self._tuners, self.source.key, self.name, backend, q.device, shape, measure)
            launch(config, plan_args(config), out, lse)
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
) -> Config:
    forced = autotune.forced()
    tuning = autotune.autotuning_enabled()  # read on every backend, so that a bad value is never ignored
    if forced is not None:
        return forced
    if backend == INTERPRETER:
        return autotune.INTERPRETER_CONFIG
    device_name, shared = _device_limits(
        device.index if device.index is not None else torch.cuda.current_device()
    )
    if not tuning:
        return autotune.heuristic(shape, shared, backward)
    tuner = tuners.get(device_name)
    if tuner is None:
        tuner = tuners[device_name] = autotune.Tuner(key, device_name)
    return tuner.tune(shape, autotune.candidates(shape, shared, backward), measure, label)


def _constants(config: Config, dim: int, dim_v: int, dtype: torch.dtype, backend: str) -> dict[str, Any]:
    """The compile-time arguments and launch options the forward and backward kernels share."""
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
            plan = make_plan(self.pattern, env, (config.block_m, config.block_n))
            assert plan.kv_tiles is not None and plan.q_tiles is not None
            return _metadata_args(plan.kv_tiles), _metadata_args(plan.q_tiles)

        def launch(config: Config, plans: tuple[list[Any], list[Any]], delta: torch.Tensor, result) -> None:
            dq, dk, dv, grad_buffers = result
            common = _constants(config, dim, dim_v, q.dtype, backend)
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
                q, k, v, dout, lse, delta, dq, *inputs, *plans[0], *strides, *dq.stride(), *sizes, **common,
                EXACT_DELTA=exact_delta,
            )  # fmt: skip
            grid = (-(-kv_len // config.block_n) * batch * k.shape[1],)
            module_.attnc_bwd_dkv[grid](
                q, k, v, dout, lse, delta, dk, dv, *inputs, *plans[1], *strides, *dk.stride(), *dv.stride(),
                *sizes, **common,
            )  # fmt: skip

        def new_result(grad_buffers: dict[str, torch.Tensor]):
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_buffers

        def measure(config: Config) -> float:
            plans, delta = plan_args(config), delta_of(config)
            scratch = new_result({n: torch.zeros_like(g) for n, g in grads.items()})
            return _do_bench(lambda: launch(config, plans, delta, scratch))

        with _on_device(q.device), _serialised(backend):
            config = _config(
                self._tuners, self.source.key, f"{self.name} backward", backend, q.device, shape, measure,
                backward=True,
            )  # fmt: skip
            result = new_result(grads)
            launch(config, plan_args(config), delta_of(config), result)
        self.last_config = config
        dq, dk, dv, _ = result
        return dq, dk, dv, {n: g.to(env.inputs[n].dtype) for n, g in grads.items()}


def _metadata_args(tiles) -> list[Any]:
    """A `BlockSparse` as kernel arguments. The kernels read one element of the FULL list for every
    row (and ignore it when the row has none), and an empty tensor may have no valid address: empty
    lists are given as one 0."""
    partial, full = (
        t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)
        for t in (tiles.partial_indices, tiles.full_indices)
    )
    return [tiles.partial_offsets, partial, tiles.full_offsets, full, tiles.heads]
