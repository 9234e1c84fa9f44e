"""Running a pattern's forward kernel: backend, configuration, plan, arguments and grid.

`Forward.run` is what `Kernel.__call__` does once its arguments are checked. The kernel argument list
is built here in the order of the template's signature (`codegen/templates/attention_fwd.py.jinja`).
Analytic patterns launch with no plan at all (the kernel derives its own loop bounds); the others
get block-sparse metadata built for the launch's tile size on the tensors' device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from attnc.codegen.spec import KernelSpec
from attnc.ir import evaluate as oracle
from attnc.ir.nodes import PatternIR
from attnc.runtime import autotune
from attnc.runtime.autotune import Config, LaunchShape
from attnc.runtime.backend import INTERPRETER, active
from attnc.runtime.cache import KernelSource, module
from attnc.runtime.plan import make_plan

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
        self.last_config: Config | None = None
        self.last_backend: str | None = None

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
        kernel = module(self.source, backend).attnc_fwd
        # Triton's interpreter cannot multiply bfloat16 matrices (see the template's UPCAST_DOT).
        upcast = backend == INTERPRETER and q.dtype == torch.bfloat16

        def plan_args(config: Config) -> list[Any]:
            if self.spec.analytic:
                return []
            tiles = make_plan(self.pattern, env, (config.block_m, config.block_n)).kv_tiles
            assert tiles is not None
            # The kernel reads one element of the FULL list for every row (and ignores it when the row
            # has none), and an empty tensor may have no valid address: empty lists are given as one 0.
            partial, full = (
                t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)
                for t in (tiles.partial_indices, tiles.full_indices)
            )
            return [tiles.partial_offsets, partial, tiles.full_offsets, full, tiles.heads]

        def launch(config: Config, plan: list[Any], out: torch.Tensor, lse: torch.Tensor) -> None:
            grid = (-(-q_len // config.block_m) * batch * heads,)
            kernel[grid](
                q, k, v, out, lse,
                *self._input_args(env),
                *plan,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                batch, heads, q_len, kv_len, shape.group, scale,
                HEAD_DIM=dim,
                HEAD_DIM_V=dim_v,
                D_PAD=autotune.padded(dim),
                DV_PAD=autotune.padded(dim_v),
                BLOCK_M=config.block_m,
                BLOCK_N=config.block_n,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
                UPCAST_DOT=upcast,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )  # fmt: skip

        def measure(config: Config) -> float:
            """Seconds one launch takes (the plan built before timing)."""
            import triton.testing

            plan, scratch_out, scratch_lse = plan_args(config), torch.empty_like(out), torch.empty_like(lse)
            ms = triton.testing.do_bench(
                lambda: launch(config, plan, scratch_out, scratch_lse), warmup=5, rep=20
            )
            return ms / 1e3

        config = self._config(backend, q.device, shape, measure)
        launch(config, plan_args(config), out, lse)
        self.last_config, self.last_backend = config, backend
        return out, lse

    def _input_args(self, env: oracle.Env) -> list[Any]:
        args: list[Any] = []
        for arg in self.spec.inputs:
            tensor = env.inputs[arg.name]
            if tensor.dtype == torch.bool:
                tensor = tensor.view(torch.uint8)
            args += [tensor, *tensor.shape, *tensor.stride()]
        return args

    def _config(self, backend: str, device: torch.device, shape: LaunchShape, measure) -> Config:
        forced = autotune.forced()
        if forced is not None:
            return forced
        if backend == "interpreter":
            return autotune.INTERPRETER_CONFIG
        device_name, shared = _device_limits(device.index if device.index is not None else 0)
        if not autotune.autotuning_enabled():
            return autotune.heuristic(shape, shared)
        tuner = self._tuners.get(device_name)
        if tuner is None:
            tuner = self._tuners[device_name] = autotune.Tuner(self.source.key, device_name)
        return tuner.tune(shape, autotune.candidates(shape, shared), measure, self.name)
