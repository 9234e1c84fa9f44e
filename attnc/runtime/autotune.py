"""Launch configurations (tile sizes, warps, stages): heuristics, forced ones, and autotuning.

- `ATTNC_CONFIG=BLOCK_M,BLOCK_N[,WARPS[,STAGES]]` forces one configuration (debugging, tests); a value
  that is not a launchable configuration is a `ConfigError` naming the variable.
- Triton's interpreter (no GPU) uses `INTERPRETER_CONFIG`: warps and stages mean nothing there.
- On a GPU with `ATTNC_AUTOTUNE=0` (or `false`, `no`, `off`, in any case; `1`, `true`, `yes`, `on`
  keep it on, anything else is a `ConfigError`), `heuristic` picks the first choice for the head dim
  (each compiled ahead of time for sm_90 without spills: tests/test_static_sm90.py) that fits the
  device's shared memory, else a fallback that also fits the register estimate (`registers`).
- Otherwise the first launch in a *shape bucket* (dtype, head dims, GQA group, and the lengths and
  number of (batch, head) programs rounded up to powers of two) times the heuristic's choice and the
  candidates that fit the device's shared memory and, by the estimate, 255 registers (none that
  spill), at most 8 (4 for the backward) in all, nearest the first choice first (`candidates`), and keeps
  the fastest. Their kernels are compiled in parallel, in a thread per candidate up to one per CPU,
  before the first is timed (`compile_all`; how many run at once depends on how much of Triton's
  compile holds Python's lock: ptxas, a child process, does not).
  Results are kept per kernel key and device in
  `$ATTNC_CACHE_DIR/autotune/<key>.<device>.json` (written atomically), so a later process reuses
  them; what such a file holds is checked (a bucket whose configuration is not a launchable one is
  tuned again, a file that is not a JSON object is ignored). Tuning that takes more than a second shows
  a progress bar on stderr.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass, fields
from typing import Any, TextIO

from attnc import config as settings
from attnc.errors import ConfigError
from attnc.runtime.cache import cache_dir, cache_subdir, read_regular, store

# The largest tile side a configuration may have (Triton's tensors hold at most 2**20 elements).
MAX_BLOCK = 1024
MAX_WARPS = 32  # 1024 threads
MAX_STAGES = 16


@dataclass(frozen=True, order=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __str__(self) -> str:
        return (
            f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}"
        )

    def problem(self) -> str | None:
        """Why the configuration cannot be launched, or None if it can."""
        if not all(type(value) is int for value in astuple(self)):
            return "its values must be ints"
        if not all(_is_pow2(b) and 16 <= b <= MAX_BLOCK for b in (self.block_m, self.block_n)):
            return f"block sizes must be powers of two from 16 to {MAX_BLOCK}"
        if not (_is_pow2(self.num_warps) and self.num_warps <= MAX_WARPS):
            return f"warps must be a power of two from 1 to {MAX_WARPS}"
        if not 1 <= self.num_stages <= MAX_STAGES:
            return f"stages must be from 1 to {MAX_STAGES}"
        return None


@dataclass(frozen=True)
class LaunchShape:
    """What a configuration's speed depends on."""

    dtype: str  # "float16", "bfloat16" or "float32"
    head_dim: int
    head_dim_v: int
    group: int  # query heads per key/value head
    q_len: int
    kv_len: int
    programs: int  # batch x query heads

    def bucket(self) -> str:
        return (
            f"{self.dtype}-d{self.head_dim}-dv{self.head_dim_v}-g{self.group}-q{_pow2(self.q_len)}"
            f"-kv{_pow2(self.kv_len)}-bh{_pow2(self.programs)}"
        )


INTERPRETER_CONFIG = Config(32, 32, 1, 1)
CANDIDATES = tuple(
    Config(bm, bn, warps, stages)
    for bm in (64, 128)
    for bn in (32, 64, 128)
    for warps in (4, 8)
    for stages in (2, 3, 4)
)
# The backward's two kernels have their own configurations (`dkv=True`: the dK/dV kernel's), with
# BLOCK_M the query tile and BLOCK_N the key tile in both. dQ owns a query tile (the MMA's M side:
# wgmma needs 64 rows per warp group); dK/dV owns a key tile (M side; its scores are S^T = K Q^T) and
# streams query tiles (N side, which may be narrow).
BACKWARD_CANDIDATES = tuple(
    Config(bm, bn, warps, stages)
    for bm, bn in ((64, 32), (64, 64), (128, 16), (128, 32), (128, 64), (64, 16), (32, 64), (32, 32))
    for warps in (4, 8)
    for stages in (1, 2, 3)
)
DKV_CANDIDATES = tuple(
    Config(bm, bn, warps, stages)
    for bm, bn in ((16, 64), (32, 64), (64, 64), (16, 128), (32, 128), (32, 32), (64, 32), (16, 32))
    for warps in (4, 8)
    for stages in (1, 2, 3)
)
# First choices by head dim (the larger of q/k's and v's, padded), each compiled for sm_90 with no
# spills (tests/test_static_sm90.py checks them): `heuristic` takes the first that fits the device's
# shared memory, then the first of the fallbacks that also fits the register estimate. Forward: at
# head dim 256 a [128, 64] score tile beside the [128, 256] accumulator spills; [128, 32] fits.
# Backward (ptxas -v, sm_90, bf16, causal unless named). Triton lays a score tile that feeds another
# product out with every warp along its rows, so with 8 warps a 64-row tile is computed by both warp
# groups (twice the elementwise work): 128-row tiles it is. dQ: 128 query rows with 32-key tiles and 3
# stages up to head dim 128 (152 registers at 128; 64-key tiles reach 252 for block_sparse), 16-key
# tiles at 256 (206, block_sparse 226). dK/dV keeps two [BLOCK_N, D] accumulators, with its query rows
# opaque (`_opaque`): 128-key tiles (16 queries, 3 stages) at head dim 64 (190 registers, 219 for sinks
# + window) and at 128 (242 for causal, 234-249 for the benchmark's patterns of one conjunct or of a
# metadata plan), where 64-key tiles would have both warp groups compute the same score tiles (1.5x the
# tensor work, and 2.5x the SASS per score: 302 for 1,024 scores against 238 for 2,048); but at 128 the
# ranges of an analytic plan of several conjuncts push 128-key tiles over (sinks + window spills 12
# bytes, prefix LM 4), so those take 64-key tiles, 16 queries, 3 stages (245 for sinks + window), and
# plans of three conjuncts or more 32 x 32 tiles on mma.sync (214 and 248 registers for three and four;
# 64-key tiles spill 104 and 248 bytes; at head dim 64 they take 64-key tiles: 228 and 254, where
# 128-key ones spill 56 bytes for four); at 256, 32-key tiles
# (mma.sync) with 32-query tiles and 3 stages (171; 227 for sinks + window; 16-query tiles: 167, but
# 1.7x the SASS instructions per score; 64 queries spill 24 bytes): 64-key tiles, whose two [64, 256]
# accumulators take 128 registers a thread, spill 220 bytes (192 with 2 stages).
_PREFERRED = {64: (Config(128, 64, 8, 3),), 128: (Config(128, 64, 8, 3),), 256: (Config(128, 32, 8, 3),)}
_FALLBACK = (
    Config(128, 64, 8, 2),
    Config(128, 64, 4, 2),
    Config(64, 64, 4, 2),
    Config(64, 32, 4, 2),
    Config(32, 32, 4, 1),
)
_PREFERRED_BACKWARD = {
    64: (Config(128, 32, 8, 3),),
    128: (Config(128, 32, 8, 3),),
    256: (Config(128, 16, 8, 3),),
}
_FALLBACK_BACKWARD = (Config(64, 32, 8, 2), Config(64, 32, 4, 2), Config(32, 32, 4, 1))
_PREFERRED_DKV = {
    64: (Config(16, 128, 8, 3),),
    128: (Config(16, 128, 8, 3),),
    256: (Config(32, 32, 8, 3),),
}
# Two conjuncts, or a device without warp-group products; three or more (`heuristic`).
_PREFERRED_DKV_CONJUNCTS = {**_PREFERRED_DKV, 128: (Config(16, 64, 8, 3),)}
_PREFERRED_DKV_MANY = {**_PREFERRED_DKV, 64: (Config(16, 64, 8, 3),), 128: (Config(32, 32, 8, 3),)}
WGMMA_ARCH = 90  # sm_90 (H100, H200): warp-group (wgmma) tensor-core products
_FALLBACK_DKV = (Config(32, 32, 8, 2), Config(32, 32, 4, 1))
# Registers per thread: ptxas spills to local memory beyond this.
MAX_REGISTERS = 255


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << math.ceil(math.log2(n))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def padded(dim: int) -> int:
    """A head dim as the kernel holds it: the next power of two, at least 16."""
    return max(16, _pow2(dim))


def shared_memory(config: Config, shape: LaunchShape, backward: bool = False, dkv: bool = False) -> int:
    """Bytes of shared memory a configuration needs (an estimate). Forward: the q tile, and a K and a
    V tile for each pipeline stage. Backward (`dkv`: the dK/dV kernel, else the dQ kernel): the tiles
    a program keeps (q and dO rows, or K and V), those it streams (K and V, or q and dO) for each
    stage, and the score tiles."""
    element = 4 if shape.dtype == "float32" else 2
    d, dv = padded(shape.head_dim), padded(shape.head_dim_v)
    if backward or dkv:
        kept, streamed = (config.block_n, config.block_m) if dkv else (config.block_m, config.block_n)
        scores = 4 * config.block_m * config.block_n
        return element * (kept * (d + dv) + config.num_stages * streamed * (d + dv)) + scores
    return element * (config.block_m * d + config.num_stages * config.block_n * (d + dv))


def registers(config: Config, shape: LaunchShape, backward: bool = False, dkv: bool = False) -> int:
    """Registers per thread a configuration needs: a coarse estimate, fitted to `ptxas -v` for sm_90 on
    16-bit inputs (`benchmarks/static_kernels.py` measures them; float32 inputs need more), erring
    high. The tiles a program keeps in registers, spread over its threads: the forward's [BLOCK_M, DV]
    float32 accumulator (with the copy the online softmax's rescaling makes) and its [BLOCK_M,
    BLOCK_N] score tiles; in the backward, the accumulators (dQ [BLOCK_M, D], or dK and dV [BLOCK_N,
    D + DV] with `dkv`), the score-sized tiles (S, P, dP, dS), and what each pipeline stage past the
    first keeps in flight. The rest (indices, addresses, descriptors, softmax rows) is a fixed part."""
    threads = 32 * config.num_warps
    d, dv = padded(shape.head_dim), padded(shape.head_dim_v)
    scores = config.block_m * config.block_n / threads
    if dkv:  # fitted to causal's dK/dV kernel at head dims 64 to 256 (4 and 8 warps)
        kept = config.block_n * (d + dv) / threads
        # A score tile that feeds another product has every warp along its rows (Triton's layout for
        # chained products), on wgmma (64 keys or more) a warp group per 64 rows: a tile of fewer rows
        # is held again by each warp group.
        holders = min(threads, 2 * config.block_n) if config.block_n >= 64 else threads
        held_scores = config.block_m * config.block_n / holders
        # The streamed q and dO tiles' operand registers, what a tile in flight keeps per stage past
        # the first, and on wgmma the resident K and V tiles' descriptors, per step along the head dim.
        streamed = config.block_m * (d + dv) / threads
        descriptors = 1.5 * (d + dv) / 16 if config.block_n >= 64 else 0
        # (The weights: of a grid of them, those with the least slack over 19 measured configurations,
        # 14 that fit and 5 that spill, in tests/test_backward_configs.py; none on the grid that counts
        # the accumulators at their full size both errs high on the first and rules out the others.)
        return math.ceil(
            84 + kept / 2 + 5 * held_scores + streamed + 8 * (config.num_stages - 1) + descriptors
        )
    if backward:  # the dQ kernel: its accumulator, and its q and dO rows
        kept = config.block_m * d / threads
        rows = config.block_m * (d + dv) / threads
        return math.ceil(40 + 0.75 * kept + 3 * scores + rows / 8 + 25 * (config.num_stages - 1))
    return math.ceil(51 + 1.25 * config.block_m * dv / threads + 2 * scores)


MAX_CANDIDATES = 8
"""The most forward configurations autotuning compiles and times per shape bucket (each compile takes
seconds of CPU on a first call): the heuristic's first choice and its nearest neighbours
(`distance`)."""
MAX_BACKWARD_CANDIDATES = 4
"""The same for each backward kernel (dQ and dK/dV are tuned apart): as many compiles in all as the
forward's."""


def distance(config: Config, first: Config) -> int:
    """How far `config` is from `first`: the steps between them, a factor of two of a block side or
    of the warps, or one pipeline stage, each counting 1."""
    steps = (
        abs(int(math.log2(a)) - int(math.log2(b)))
        for a, b in zip(astuple(config)[:3], astuple(first)[:3], strict=True)
    )
    return sum(steps) + abs(config.num_stages - first.num_stages)


def candidates(
    shape: LaunchShape,
    max_shared: int,
    backward: bool = False,
    dkv: bool = False,
    block: tuple[int, int] | None = None,
    conjuncts: int = 1,
    arch: int = 90,
) -> list[Config]:
    """The configurations autotuning times (`dkv`: the backward's dK/dV kernel's, `backward`: its dQ
    kernel's): the heuristic's first choice, then those that fit the device's shared memory and, by
    the register estimate, do not spill (if none does, those that fit, fewest registers first),
    nearest to the first choice first (`distance`; ties: fewer registers, then the smaller
    configuration), at most `MAX_CANDIDATES` in all (`MAX_BACKWARD_CANDIDATES` for a backward
    kernel). `block`: only those of that (BLOCK_M, BLOCK_N) (a plan's), the cap counted among them.
    `conjuncts`, `arch`: as for `heuristic`."""
    pool = DKV_CANDIDATES if dkv else BACKWARD_CANDIDATES if backward else CANDIDATES
    cap = MAX_BACKWARD_CANDIDATES if backward or dkv else MAX_CANDIDATES
    fitting = [c for c in pool if shared_memory(c, shape, backward, dkv) <= max_shared]
    chosen = [c for c in fitting if registers(c, shape, backward, dkv) <= MAX_REGISTERS]
    if not chosen:
        chosen = sorted(fitting, key=lambda c: registers(c, shape, backward, dkv))[:cap]
    first = heuristic(shape, max_shared, backward, dkv, conjuncts, arch)
    nearest = sorted(
        (c for c in chosen if c != first),
        key=lambda c: (distance(c, first), registers(c, shape, backward, dkv), c),
    )
    ranked = [first, *nearest]
    if block is not None:
        ranked = [c for c in ranked if (c.block_m, c.block_n) == block]
    return ranked[:cap]


def heuristic(
    shape: LaunchShape,
    max_shared: int,
    backward: bool = False,
    dkv: bool = False,
    conjuncts: int = 1,
    arch: int = 90,
) -> Config:
    """The first choice for the head dim that fits the device's shared memory; else the first fallback
    that also fits the register estimate; else the smallest. `dkv`: the backward's dK/dV kernel's,
    `backward`: its dQ kernel's; `conjuncts`: the conjuncts of the pattern's analytic plan (1 for a
    metadata plan), whose ranges the dK/dV kernel keeps (`kernel_conjuncts`); `arch`: the device's
    NVIDIA architecture (major * 10 + minor; 0 for ROCm). dK/dV's 128-key tiles at head dim 128 are
    for the warp-group products of sm_90 (on sm_80 mma.sync they spill for half the benchmark's
    patterns, where 64-key tiles do not) and plans of one conjunct; 64-key tiles spill for three or
    more (104 bytes for three, 248 for NATTEN's 1-D neighbourhood's four), 32 x 32 tiles do not. At
    head dim 64 three or more conjuncts take 64-key tiles (128-key ones spill 56 bytes for four)."""
    if dkv:
        if conjuncts > 2:
            preferred = _PREFERRED_DKV_MANY
        elif conjuncts > 1 or arch != WGMMA_ARCH:
            preferred = _PREFERRED_DKV_CONJUNCTS
        else:
            preferred = _PREFERRED_DKV
        fallback = _FALLBACK_DKV
    elif backward:
        preferred, fallback = _PREFERRED_BACKWARD, _FALLBACK_BACKWARD
    else:
        preferred, fallback = _PREFERRED, _FALLBACK
    dim = padded(max(shape.head_dim, shape.head_dim_v))
    for config in preferred[min(max(dim, 64), 256)]:
        if shared_memory(config, shape, backward, dkv) <= max_shared:
            return config
    for config in fallback:
        if (
            shared_memory(config, shape, backward, dkv) <= max_shared
            and registers(config, shape, backward, dkv) <= MAX_REGISTERS
        ):
            return config
    return fallback[-1]


def kernel_conjuncts(ranges: tuple[Any, ...] | None) -> int:
    """The `conjuncts` of `heuristic` for a spec's ranges (`spec.q_ranges`: one per conjunct of an
    analytic plan; None for a metadata plan, whose kernels keep no ranges: 1)."""
    return max(1, len(ranges or ()))


def forced() -> Config | None:
    """The configuration `ATTNC_CONFIG` forces, if set (`attnc.config` reads it)."""
    given = settings.forced_config()
    if given is None:
        return None
    text, values = given
    forced_config = Config(*values)
    problem = forced_config.problem()
    if problem is not None:
        raise ConfigError(f"ATTNC_CONFIG: {problem}, got {text!r}")
    return forced_config


def autotuning_enabled() -> bool:
    """Whether `ATTNC_AUTOTUNE` leaves autotuning on (its default; `attnc.config` reads it)."""
    return settings.autotune()


def _saved_config(value: Any) -> Config | None:
    """The configuration a tuning file saved for a bucket, or None if it is not a launchable one."""
    if not isinstance(value, dict) or set(value) != {f.name for f in fields(Config)}:
        return None
    config = Config(**value)
    return config if config.problem() is None else None


def compile_workers(count: int) -> int:
    """Threads that compile `count` configurations: one each, at most one per CPU."""
    return max(1, min(count, os.cpu_count() or 1))


def compile_all(configs: list[Config], compile: Callable[[Config], None]) -> None:
    """Compile the kernels of every configuration at once, in `compile_workers` threads, before any is
    timed. `compile(config)` runs here, one configuration after another (Triton's launch binder and
    attnc's plans are not shared between threads); it warms the kernels up (`JITFunction.warmup`),
    and under Triton's `AsyncCompileMode` each warmup hands the compile itself (the front end, LLVM,
    ptxas) to the pool and returns; leaving the mode waits for them all. A compile that fails is left
    out here, and fails again, with its own error, when its configuration is timed. Where Triton has no
    `AsyncCompileMode`, or the caller already runs one, each configuration compiles when it is first
    timed, as before."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:  # a Triton release without asynchronous compiles
        return
    if active_mode.get() is not None:
        return
    with (
        ThreadPoolExecutor(compile_workers(len(configs)), thread_name_prefix="attnc-compile") as pool,
        AsyncCompileMode(pool, ignore_errors=True),
    ):
        for config in configs:
            compile(config)


class Progress:
    """A one-line progress bar on a stream, shown only once the work has taken more than `delay_s`."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, delay_s: float = 1.0) -> None:
        self.total, self.label = total, label
        self.stream = sys.stderr if stream is None else stream
        self.delay_s = delay_s
        self.start = time.perf_counter()
        self.done = 0
        self.shown = False

    def step(self) -> None:
        self.done += 1
        if self.shown or time.perf_counter() - self.start >= self.delay_s:
            width = 30
            filled = width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
            self.stream.flush()
            self.shown = True

    def close(self) -> None:
        if self.shown:
            elapsed = time.perf_counter() - self.start
            self.stream.write(f" ({elapsed:.1f} s)\n")
            self.stream.flush()


class Tuner:
    """Configurations of one kernel on one device, by shape bucket, persisted on disk."""

    def __init__(self, key: str, device: str) -> None:
        self.path = cache_dir() / "autotune" / f"{key}.{re.sub(r'[^A-Za-z0-9_-]+', '-', device)}.json"
        self._chosen: dict[str, Config] | None = None

    def _load(self) -> dict[str, Config]:
        """The saved configurations by bucket: only launchable ones, whatever the file holds."""
        if self._chosen is None:
            self._chosen = {}
            cache_subdir("autotune")  # refused if another user owns it
            data = read_regular(self.path)
            try:
                raw = json.loads(data) if data is not None else None
            except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep
                raw = None
            for bucket, value in raw.items() if isinstance(raw, dict) else ():
                config = _saved_config(value)
                if config is not None:
                    self._chosen[bucket] = config
        return self._chosen

    def known(self, shape: LaunchShape) -> Config | None:
        return self._load().get(shape.bucket())

    def tune(
        self,
        shape: LaunchShape,
        configs: list[Config],
        measure: Callable[[Config], float],
        label: str,
        stream: TextIO | None = None,
        compile: Callable[[Config], None] | None = None,
    ) -> Config:
        """The fastest of `configs` by `measure` (seconds; inf, or Triton's `OutOfResources`, rules a
        config out; any other error is a fault of the kernel and propagates), remembered for the
        bucket and written to disk. `compile`: starts the compile of a configuration's kernels
        without launching them (`compile_all` runs it for every configuration before the first is
        timed, so that they compile in parallel)."""
        chosen = self.known(shape)
        if chosen is not None:
            return chosen
        if compile is not None:
            compile_all(configs, compile)
        progress = Progress(len(configs), f"attnc: autotuning {label} ({shape.bucket()})", stream)
        from triton.runtime.errors import OutOfResources

        best, best_time = None, math.inf
        first_error: Exception | None = None
        for config in configs:
            try:
                elapsed = measure(config)
            except OutOfResources as error:  # more shared memory or registers than the device has
                first_error = first_error or error
                elapsed = math.inf
            if elapsed < best_time:
                best, best_time = config, elapsed
            progress.step()
        progress.close()
        if best is None:
            raise RuntimeError(
                f"attnc: no launch configuration ran for {label} ({shape.bucket()})"
            ) from first_error
        chosen_map = self._load()
        chosen_map[shape.bucket()] = best
        text = json.dumps({b: asdict(c) for b, c in sorted(chosen_map.items())}, indent=1)
        self.path = store("autotune", self.path.name, text)
        return best
