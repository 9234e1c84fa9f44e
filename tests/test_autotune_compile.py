"""Autotuning's first call: the candidates it compiles (pruned by shared memory, the register estimate
and a cap, nearest the heuristic's first choice first) and their compiles in parallel before any is
timed (`autotune.compile_all`), checked without a GPU: a fake compile shows the pool, and the
launcher runs on a faked device whose kernels record their warmups and launches."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from triton.runtime._async_compile import AsyncCompileMode, active_mode

import attnc
from attnc.runtime import autotune, launch, registry
from attnc.runtime.autotune import Config, LaunchShape, Tuner

H100_SHARED = 232448  # bytes per block, opt-in
A100_SHARED = 166912
SHAPE = LaunchShape("bfloat16", 128, 128, 1, 16384, 16384, 32)


def shapes() -> list[LaunchShape]:
    return [
        LaunchShape(dtype, dim, dim, 1, 16384, 16384, 32)
        for dtype in ("bfloat16", "float32")
        for dim in (64, 128, 256)
    ]


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("max_shared", [H100_SHARED, A100_SHARED])
def test_candidates_are_the_first_choice_and_its_nearest_fitting_neighbours_at_most_a_cap(
    backward: bool, max_shared: int
) -> None:
    for shape in shapes():
        chosen = autotune.candidates(shape, max_shared, backward)
        first = autotune.heuristic(shape, max_shared, backward)
        cap = autotune.MAX_BACKWARD_CANDIDATES if backward else autotune.MAX_CANDIDATES
        assert chosen[0] == first and len(chosen) == len(set(chosen)) <= cap
        distances = [autotune.distance(c, first) for c in chosen[1:]]
        assert distances == sorted(distances)
        pool = autotune.BACKWARD_CANDIDATES if backward else autotune.CANDIDATES
        fitting = [
            c
            for c in pool
            if autotune.shared_memory(c, shape, backward) <= max_shared
            and autotune.registers(c, shape, backward) <= autotune.MAX_REGISTERS
        ]
        assert set(chosen[1:]) <= set(fitting)
        left_out = set(fitting) - set(chosen)
        if left_out:  # only when the cap is reached, and none nearer than the farthest kept
            assert len(chosen) == cap
            assert min(autotune.distance(c, first) for c in left_out) >= max(distances)


def test_the_cap_leaves_out_candidates_of_a_large_pool() -> None:
    shape = LaunchShape("bfloat16", 64, 64, 1, 16384, 16384, 32)
    assert len(autotune.candidates(shape, H100_SHARED)) == autotune.MAX_CANDIDATES
    fitting = [
        c
        for c in autotune.CANDIDATES
        if autotune.shared_memory(c, shape) <= H100_SHARED and autotune.registers(c, shape) <= 255
    ]
    assert len(fitting) > autotune.MAX_CANDIDATES


def test_a_plans_block_keeps_its_own_configurations_under_the_cap() -> None:
    shape = LaunchShape("float16", 64, 64, 1, 4096, 4096, 32)
    assert (64, 128) not in {(c.block_m, c.block_n) for c in autotune.candidates(shape, H100_SHARED)}
    pinned = autotune.candidates(shape, H100_SHARED, block=(64, 128))
    assert pinned and len(pinned) <= autotune.MAX_CANDIDATES
    assert {(c.block_m, c.block_n) for c in pinned} == {(64, 128)}


def test_distance_counts_steps_of_each_field() -> None:
    first = Config(128, 64, 8, 3)
    assert autotune.distance(first, first) == 0
    assert autotune.distance(Config(64, 64, 8, 3), first) == 1
    assert autotune.distance(Config(32, 128, 4, 1), first) == 2 + 1 + 1 + 2


def test_the_tuner_compiles_every_candidate_at_once_in_a_pool_before_timing_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    configs = [Config(64, 32), Config(128, 64), Config(64, 64)]
    together = threading.Barrier(len(configs), timeout=30)  # passes only if all three compile at once
    events: list[tuple[str, Config]] = []
    threads: set[str] = set()

    def compile_on_pool(config: Config) -> None:
        def work() -> None:
            threads.add(threading.current_thread().name)
            together.wait()
            events.append(("compiled", config))

        mode = active_mode.get()  # what Triton's warmup submits its compile to
        assert mode is not None
        mode.executor.submit(work)

    def measure(config: Config) -> float:
        events.append(("timed", config))
        return float(config.block_m)

    chosen = Tuner("k" * 64, "gpu").tune(SHAPE, configs, measure, "p", io.StringIO(), compile_on_pool)
    assert chosen == Config(64, 32)
    assert {e for e in events if e[0] == "compiled"} == {("compiled", c) for c in configs}
    assert [e[0] for e in events] == ["compiled"] * 3 + ["timed"] * 3
    assert len(threads) == 3 and all(name.startswith("attnc-compile") for name in threads)
    assert active_mode.get() is None  # the mode ends with the tuning


def test_compile_threads_are_one_per_candidate_at_most_one_per_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert autotune.compile_workers(8) == 8
    assert autotune.compile_workers(40) == 16
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert autotune.compile_workers(8) == 1


def test_under_a_callers_async_compile_mode_each_candidate_compiles_when_timed() -> None:
    compiled: list[Config] = []
    with ThreadPoolExecutor(1) as pool, AsyncCompileMode(pool):
        autotune.compile_all([Config(64, 64)], compiled.append)
    assert compiled == []


# ---- the launcher on a faked GPU --------------------------------------------------------------------------


def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What Triton specialises a launch on: tensors by dtype, shape, strides and 16-byte alignment,
    the rest by value."""

    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", value.dtype, tuple(value.shape), value.stride(), value.data_ptr() % 16 == 0)
        return value

    return tuple(one(a) for a in args), tuple(sorted((k, one(v)) for k, v in kwargs.items()))


class FakeKernel:
    """A jitted kernel on a faked GPU: warmups (compiles) and launches are recorded, nothing runs."""

    def __init__(self, name: str, log: list[tuple[str, str, Any]]) -> None:
        self.name, self.log = name, log

    def warmup(self, *args: Any, grid: Any, **kwargs: Any) -> None:
        assert active_mode.get() is not None, "a warmup outside the parallel compile"
        self.log.append(("compile", self.name, signature(args, kwargs)))

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.log.append(("launch", self.name, signature(args, kwargs)))


class FakeModule:
    def __init__(self, log: list[tuple[str, str, Any]]) -> None:
        self.log = log

    def __getattr__(self, name: str) -> FakeKernel:
        return FakeKernel(name, self.log)


@pytest.mark.parametrize("backward", [False, True])
def test_the_launcher_compiles_each_candidates_kernels_as_they_are_timed_before_timing_any(
    backward: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNC_AUTOTUNE", "1")
    monkeypatch.delenv("ATTNC_CONFIG", raising=False)
    log: list[tuple[str, str, Any]] = []
    device = f"a faked GPU {tmp_path.name}"  # a tuner of its own, nothing known
    monkeypatch.setattr(launch, "active", lambda: launch.CUDA)
    monkeypatch.setattr(launch, "module", lambda source, backend: FakeModule(log))
    monkeypatch.setattr(launch, "_device_limits", lambda index: launch.DeviceLimits(device, H100_SHARED, 90))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def bench(fn: Callable[[], None]) -> float:
        log.append(("timing", "", None))
        fn()
        return 1.0

    monkeypatch.setattr(launch, "_do_bench", bench)
    kern = attnc.stdlib().causal()
    forward = registry.find(kern._op_pattern)
    q, k, v = (torch.zeros(1, 2, 40, 16) for _ in range(3))
    env = kern._env(40, 40, 1, 2, {}, {}, q.device)
    if backward:
        out, lse = torch.zeros_like(q), torch.zeros(1, 2, 40)
        forward.backward.run(q, k, v, out, lse, torch.zeros_like(out), None, env, 0.25, ())
    else:
        forward.run(q, k, v, env, 0.25)
    shape = LaunchShape("float32", 16, 16, 1, 40, 40, 2)
    # Each kernel tuned apart (the backward's dQ, with the preprocess that computes its Delta, then
    # dK/dV, whose timing launches the preprocess too): its candidates' kernels all compiled, in one
    # run of warmups, before its first timing.
    if backward:
        groups = [
            (("attnc_bwd_preprocess", "attnc_bwd_dq"), autotune.candidates(shape, H100_SHARED, True)),
            (("attnc_bwd_preprocess", "attnc_bwd_dkv"), autotune.candidates(shape, H100_SHARED, True, True)),
        ]
    else:
        groups = [(("attnc_fwd",), autotune.candidates(shape, H100_SHARED))]
    runs: list[list[tuple[str, str, Any]]] = []  # each run of warmups, then what ran until the next
    for entry in log:
        if entry[0] == "compile" and (not runs or runs[-1][-1][0] != "compile"):
            runs.append([])
        assert runs, "a launch or a timing before any compile"
        runs[-1].append(entry)
    assert len(runs) == len(groups)
    call = 3 if backward else 1  # the call's own launches, at the end
    for (kernels, configs), run in zip(groups, runs, strict=True):
        compiles = [e for e in run if e[0] == "compile"]
        assert run[: len(compiles)] == compiles  # every compile before the first timing
        assert len(compiles) == len(configs) * len(kernels)
        assert {n for _, n, _ in compiles} == set(kernels)
        timed = [e for e in run if e[0] == "launch"]
        if run is runs[-1]:
            timed = timed[:-call]
        # Each timed launch is one a warmup compiled (the same specialisation: a cache hit).
        assert {(n, s) for _, n, s in timed} == {(n, s) for _, n, s in compiles}


def test_under_the_interpreter_nothing_is_compiled_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_AUTOTUNE", "1")
    monkeypatch.delenv("ATTNC_CONFIG", raising=False)
    monkeypatch.setattr(autotune, "compile_all", lambda configs, compile: pytest.fail("compiled ahead"))
    kern = attnc.stdlib().causal()
    q, k, v = (torch.randn(1, 1, 40, 16) for _ in range(3))
    torch.testing.assert_close(kern(q, k, v), kern.reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert registry.find(kern._op_pattern).last_config == autotune.INTERPRETER_CONFIG


_BENCHMARK_LAUNCHES = """
import json, sys
sys.path.insert(0, "benchmarks")
import autotune_compile as bench
found = {}
for backward in (False, True):
    compiles = bench.candidate_lists(backward)["pruned"]
    items = bench.launches(compiles, backward)
    found[str(backward)] = [[kernel, str(config)] for kernel, config in compiles], [
        [item.kernel, str(config)] for config, item in items
    ]
print(json.dumps(found))
"""


def test_the_benchmark_records_one_launch_of_each_kernel_per_candidate() -> None:
    """`benchmarks/autotune_compile.py --aot` compiles what a first call's autotuning compiles: each
    candidate's kernel (the forward's; the backward's dQ and dK/dV, tuned apart) recorded once, at
    its own configuration. Recording needs Triton's compiler, not its interpreter: a child process."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", _BENCHMARK_LAUNCHES],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for backward, (compiles, recorded) in found.items():
        assert recorded == compiles, backward
    kernels = {kernel for kernel, _ in found["True"][0]}
    assert kernels == {"attnc_bwd_dq", "attnc_bwd_dkv"}
    assert {kernel for kernel, _ in found["False"][0]} == {"attnc_fwd"}
