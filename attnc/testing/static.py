"""Ahead-of-time compilation of attnc's kernels for NVIDIA GPUs, without one, and what the compiled code
shows: registers and spills (`ptxas -v`), shared memory, tensor-core instructions (`wgmma` on sm_90),
software-pipelined loops (the TTGIR) and the SASS instructions of each loop iteration by kind.

A kernel is compiled exactly as a launch would build it: attnc's own launcher (`runtime/launch.py`)
runs with its kernels replaced by recorders, so the argument list, constexprs and launch options are
the ones a GPU launch passes; Triton's launch binder then specialises them (types, 16-byte alignment,
ints equal to 1) and `triton.compile` builds for a `GPUTarget` with the ptxas in Triton's wheel. This
needs Triton's GPU compiler, not its interpreter: in a process that runs kernels under the interpreter
(`import attnc` without a GPU), `compile_isolated` does the work in a child process with
`TRITON_INTERPRET=0`.

Used by `tests/test_static_sm90.py` (the checks CI runs) and `benchmarks/static_kernels.py` (the table).
Command line: `TRITON_INTERPRET=0 python -m attnc.testing.static [PATTERN ...] [--dim 128] [--arch 90]
[--backward] [--config BM,BN,WARPS,STAGES] [--kernel NAME]` (a backward job records each of its
kernels at its own first choice, `--config` forces one on both); `ATTNC_STATIC_DUMP=dir` also writes
each kernel's TTGIR, PTX and SASS there. A loop counts as pipelined when it issues copies for later
iterations and no wait in it drains them all (two or more tiles in flight).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from attnc import bench
from attnc import config as settings
from attnc.api import loads, stdlib
from attnc.runtime import autotune, backend, launch
from attnc.runtime.autotune import Config, LaunchShape


@dataclass(frozen=True)
class Arch:
    """A GPU generation to compile for."""

    capability: int  # 90: sm_90 (Hopper), 80: sm_80 (Ampere)
    device: str
    max_shared: int  # bytes of shared memory one block may use (the opt-in maximum)


ARCHS = {
    90: Arch(90, "H100", 232448),  # 227 KiB
    80: Arch(80, "A100", 166912),  # 163 KiB
}
MAX_REGISTERS = 255  # per thread
BATCH, HEADS = 2, 4  # of the tensors a recorded launch is given (strides: neither is 1)


# ---- recording the launches ------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch as attnc's launcher makes it: the jitted function and its arguments."""

    kernel: str
    fn: Any  # a triton JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Recorder:
    """Stands for a kernel module: `module.attnc_fwd[grid](*args, **kwargs)` records the launch."""

    def __init__(self, real: Any, launches: list[Launch]) -> None:
        self._real, self._launches = real, launches

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._real, name)
        launches = self._launches

        class _Grid:
            def __getitem__(self, grid: Any) -> Any:
                def record(*args: Any, **kwargs: Any) -> None:
                    launches.append(Launch(name, fn, args, kwargs))

                return record

        return _Grid()


@contextlib.contextmanager
def _recording(launches: list[Launch], config: Config, dkv_config: Config | None = None) -> Iterator[None]:
    """attnc's launcher, with `config` forced (as ATTNC_CONFIG forces one; `dkv_config`, if given, for
    the backward's dK/dV kernel) and every kernel launch recorded instead of run."""
    real_module = launch.module

    def chosen(*args: Any, dkv: bool = False, **kwargs: Any) -> Config:
        return dkv_config if dkv and dkv_config is not None else config

    with (
        mock.patch.object(launch, "module", lambda source, b: _Recorder(real_module(source, b), launches)),
        mock.patch.object(launch, "_config", chosen),
    ):
        yield


SOFTCAP_SOURCE = """
pattern softcap_causal(cap: float = 30.0) {
    mask = causal
    score = cap * tanh(s / cap)
}
"""


def _softcap_causal(
    shape: bench.Shape, scale: bench.Scale, device: torch.device, seed: int
) -> bench.Workload:
    """Causal attention with soft-capped scores (Gemma 2's `cap * tanh(s / cap)`): not a benchmark
    pattern, but the kernel that shows what the score function's tanh costs beside causal's."""
    kernel = loads(SOFTCAP_SOURCE, "<softcap_causal>").softcap_causal(cap=30.0)
    return bench.Workload(
        "softcap_causal", "causal, soft cap 30", {"cap": 30.0}, kernel, {}, lambda b, h, q, kv: kv <= q,
        False, False, True,
    )  # fmt: skip


def _neighborhood_1d(
    shape: bench.Shape, scale: bench.Scale, device: torch.device, seed: int
) -> bench.Workload:
    """NATTEN's 1-D neighbourhood (13 keys): not a benchmark pattern, but an analytic plan of four
    conjuncts (the window, and its three clamps at the borders), whose ranges cost the dK/dV kernel
    registers (`autotune.heuristic`'s `conjuncts`)."""
    kernel = stdlib().neighborhood_1d(kernel=13)
    return bench.Workload(
        "neighborhood_1d", "1-D neighbourhood 13", {"kernel": 13}, kernel, {}, lambda b, h, q, kv: q >= 0,
        False, False, None,
    )  # fmt: skip


# The patterns a Job may name: the benchmark's, and the static checks' own.
PATTERNS = {**bench.PATTERNS, "softcap_causal": _softcap_causal, "neighborhood_1d": _neighborhood_1d}


@dataclass(frozen=True)
class Job:
    """One pattern of attnc's benchmark (`attnc/bench.py`), at one head dim, for one GPU generation."""

    pattern: str
    head_dim: int
    arch: int = 90
    backward: bool = False
    dtype: str = "bfloat16"
    length: int = 4096
    config: Config | None = None  # None: the heuristic's first choice for the device


def first_config(job: Job, dkv: bool = False, conjuncts: int = 1) -> Config:
    """The configuration a launch tries first on the job's device: `autotune.heuristic`'s choice
    (`dkv`: for the backward's dK/dV kernel, of a pattern whose analytic plan has `conjuncts`)."""
    shape = _shape(job)
    return autotune.heuristic(shape, ARCHS[job.arch].max_shared, job.backward, dkv, conjuncts, job.arch)


def _shape(job: Job) -> LaunchShape:
    return LaunchShape(job.dtype, job.head_dim, job.head_dim, 1, job.length, job.length, BATCH * HEADS)


def record(job: Job) -> list[Launch]:
    """The kernel launches of one forward (or backward) call of the job (each launch's keywords hold
    its configuration)."""
    if backend.active() == backend.INTERPRETER:
        raise RuntimeError(
            "ahead-of-time compilation needs Triton's compiler: set TRITON_INTERPRET=0 before importing "
            "attnc, or use compile_isolated"
        )
    workload = PATTERNS[job.pattern](
        bench.Shape(job.length, BATCH, HEADS), bench.GPU_SCALE, torch.device("cpu"), 0
    )
    kern = workload.kernel
    config = job.config or first_config(job)
    dkv_config = None
    if job.backward:
        conjuncts = autotune.kernel_conjuncts(kern._forward.backward.spec.q_ranges)
        dkv_config = job.config or first_config(job, dkv=True, conjuncts=conjuncts)
    dtype = bench.DTYPES[job.dtype]
    q, k, v = (torch.zeros(BATCH, HEADS, job.length, job.head_dim, dtype=dtype) for _ in range(3))
    inputs, params = kern._split(workload.inputs)
    env = kern._env(job.length, job.length, BATCH, HEADS, inputs, params, q.device)
    scale = job.head_dim**-0.5
    launches: list[Launch] = []
    with _recording(launches, config, dkv_config):
        forward = kern._forward
        if not job.backward:
            forward.run(q, k, v, env, scale)
        else:
            out, lse = torch.zeros_like(q), torch.zeros(q.shape[:3])
            forward.backward.run(q, k, v, out, lse, torch.zeros_like(out), None, env, scale, ())
    return launches


# ---- compiling -------------------------------------------------------------------------------------------


def compile_launch(item: Launch, arch: int) -> Any:
    """`triton.compile` of a recorded launch for an NVIDIA target: the kernel a launch would build."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    target_backend = make_backend(target)
    fn = item.fn
    binder = create_function_from_signature(fn.signature, fn.params, target_backend)
    kwargs = {"debug": False, **item.kwargs}
    bound, specialization, options = binder(*item.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        target_backend, kwargs, bound, specialization, options
    )
    return triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )


def _tool(name: str, arch: int) -> str:
    """A CUDA tool in Triton's wheel; ptxas as Triton picks it (Triton 3.9's PTX for sm_90 needs its
    newer `ptxas-blackwell`)."""
    from triton.backends.nvidia import compiler as nvidia

    if name == "ptxas":
        try:
            return nvidia.get_ptxas(arch).path
        except TypeError:  # Triton releases whose get_ptxas takes no architecture
            return nvidia.get_ptxas().path  # type: ignore[call-arg]
    return str(Path(nvidia.__file__).parent / "bin" / name)


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(ptx: str, arch: int) -> tuple[dict[str, int], str]:
    """Registers and spill bytes from `ptxas -v`, run with the options Triton compiles with."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        run = subprocess.run(
            [_tool("ptxas", arch), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(path),
             "-o", str(Path(tmp) / "kernel.o")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    usage = {}
    for key, pattern in _PTXAS.items():
        found = pattern.search(run.stderr)
        usage[key] = int(found.group(1)) if found else 0
    return usage, run.stderr


def ptxas_version(arch: int = 90) -> str:
    out = subprocess.run([_tool("ptxas", arch), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{found.group(1)} ({found.group(2)})" if found else out.strip().splitlines()[-1]


# ---- reading the TTGIR: loops and their pipelining --------------------------------------------------------


@dataclass
class Loop:
    """One `scf.for` of the TTGIR that multiplies tiles (holds a dot), as the pipeliner left it."""

    dots: int  # tensor-core products in the body
    wgmma_dots: int  # of which warp-group (wgmma) products
    async_copies: int  # global -> shared copies the body issues for later iterations (cp.async or TMA)
    min_wait: int | None  # the fewest copy groups an `async_wait` in the body leaves in flight
    pipelined: bool  # copies for later iterations are issued, and no wait drains all of them


_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\b")
_COPY = re.compile(r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local|ttng\.async_copy")
_WAIT = re.compile(r"ttg\.async_wait\b.*\{num = (\d+) : i32\}")
_TMA_WAIT = re.compile(r"ttng\.wait_barrier")


def ttgir_loops(ttgir: str) -> list[Loop]:
    """The loops that hold a dot, innermost first in source order (the body of one loop is read up to
    the `}` at its own indentation, nested loops included)."""
    lines = ttgir.splitlines()
    loops = []
    for i, line in enumerate(lines):
        if not re.match(r"\s*(%\S+ = )?scf\.for\b", line):
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for inner in lines[i + 1 :]:
            if inner.strip().startswith("}") and len(inner) - len(inner.lstrip()) == indent:
                break
            body.append(inner)
        if any("scf.for" in b for b in body):
            continue  # an outer loop: its inner loops are reported themselves
        text = "\n".join(body)
        dots = _DOT.findall(text)
        if not dots:
            continue
        waits = [int(n) for n in _WAIT.findall(text)]
        copies = len(_COPY.findall(text))
        min_wait = min(waits) if waits else None
        tma_waits = bool(_TMA_WAIT.search(text))
        pipelined = copies > 0 and (
            (min_wait is not None and min_wait > 0) or (min_wait is None and tma_waits)
        )
        loops.append(Loop(len(dots), dots.count("ttng.warp_group_dot"), copies, min_wait, pipelined))
    return loops


# ---- reading the SASS: instructions per loop iteration ---------------------------------------------

# SASS opcodes by the unit that issues them (the opcode is the first word, its modifiers after dots).
_KINDS = {
    "mma": set(["HGMMA", "HMMA", "IMMA", "UTCHMMA", "UTCMMA"]),
    "mufu": {"MUFU"},
    "fp32": set(
        ["FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK", "FSWZADD", "FADD2", "FMUL2", "FFMA2"]
    ),
    "int": set(
        [
            "IMAD",
            "IADD3",
            "IADD",
            "LEA",
            "ISETP",
            "LOP3",
            "SHF",
            "IMNMX",
            "SEL",
            "ISCADD",
            "IABS",
            "PRMT",
            "SGXT",
            "VIADD",
            "VIMNMX",
            "VIADDMNMX",
            "IDP",
            "POPC",
            "FLO",
            "BMSK",
            "BREV",
            "LOP",
            "SHL",
            "SHR",
            "IMUL",
            "UIMAD",
            "UIADD3",
            "ULEA",
            "UISETP",
            "ULOP3",
            "USHF",
            "USEL",
            "UIMNMX",
            "UPRMT",
            "UFLO",
            "UPOPC",
            "UBMSK",
            "USGXT",
            "UIABS",
            "ULOP",
            "UIADD",
            "UVIADD",
        ]
    ),
    "convert": set(["F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP"]),
    "memory": set(
        [
            "LDG",
            "STG",
            "LDS",
            "STS",
            "LDSM",
            "STSM",
            "LDGSTS",
            "UTMALDG",
            "UTMASTG",
            "UBLKCP",
            "LDL",
            "STL",
            "RED",
            "ATOM",
            "ATOMG",
            "REDG",
            "LD",
            "ST",
        ]
    ),
}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def _opcode(text: str) -> str:
    words = text.split()
    if words and words[0].startswith("@"):  # a predicate guard
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def kind_of(text: str) -> str:
    op = _opcode(text)
    for kind, ops in _KINDS.items():
        if op in ops:
            return kind
    return "other"


@dataclass
class SassLoop:
    """One innermost SASS loop that holds a tensor-core product: instructions per iteration by kind."""

    instructions: int
    by_kind: dict[str, int]


def sass_text(cubin: bytes, arch: int) -> str:
    """The cubin disassembled by the wheel's nvdisasm ("" where the wheel has none)."""
    if not Path(_tool("nvdisasm", arch)).is_file():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(cubin)
    try:
        run = subprocess.run(
            [_tool("nvdisasm", arch), "-c", "-hex", file.name], capture_output=True, text=True
        )
        return run.stdout
    finally:
        os.remove(file.name)


def sass_loops(sass: str) -> list[SassLoop]:
    """Every innermost loop (a backward branch, target to branch) whose body holds an MMA."""
    instructions: list[tuple[int, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = _SASS_LINE.search(line)
        if found:
            address = int(found.group(1), 16)
            instructions.append((address, found.group(2).strip()))
            labels.update((name, address) for name in pending)
            pending = []
    spans = []
    for address, text in instructions:
        if _opcode(text) != "BRA":
            continue
        target = re.search(r"(\.L_x_\d+)", text)
        start = labels.get(target.group(1)) if target else None
        if start is None or start > address:
            continue
        body = [t for a, t in instructions if start <= a <= address]
        if any(_opcode(t) == "EXIT" for t in body):
            continue  # a retry path after the kernel's end that jumps back into a loop
        if any(kind_of(t) == "mma" for t in body):
            spans.append((start, address, body))
    innermost = [s for s in spans if not any(o is not s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    loops = []
    for _, _, body in sorted(innermost, key=lambda s: s[0]):
        counts: dict[str, int] = {}
        for text in body:
            counts[kind_of(text)] = counts.get(kind_of(text), 0) + 1
        loops.append(SassLoop(len(body), counts))
    return loops


# ---- the report -----------------------------------------------------------------------------------------


@dataclass
class KernelReport:
    """What one kernel compiled to, for one device."""

    pattern: str
    kernel: str
    arch: int
    head_dim: int
    dtype: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int  # bytes of shared memory Triton allocates
    ptx_wgmma: int  # wgmma.mma_async instructions in the PTX
    loops: list[Loop] = field(default_factory=list)
    sass_loops: list[SassLoop] = field(default_factory=list)
    compile_s: float = 0.0
    ptx_tanh: int = 0  # tanh.approx.f32 instructions in the PTX (the hardware tanh, `_tanh`'s FAST path)

    def problems(self) -> list[str]:
        """What the CI checks refuse: spills, too much shared memory, products not on the warp-group
        tensor cores (sm_90), loops whose K/V (or Q/dO) tiles are not fetched ahead."""
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills ({self.spill_stores} bytes stored, {self.spill_loads} loaded)")
        limit = ARCHS[self.arch].max_shared
        if self.shared > limit:
            found.append(
                f"{self.shared} bytes of shared memory, more than the {ARCHS[self.arch].device}'s {limit}"
            )
        if self.arch >= 90:
            if not self.ptx_wgmma:
                found.append("no wgmma in the PTX")
            slow = sum(loop.dots - loop.wgmma_dots for loop in self.loops)
            if slow:
                found.append(f"{slow} product(s) in loops not on wgmma")
        if not self.loops:
            found.append("no loop with a tensor-core product")
        unpipelined = [i for i, loop in enumerate(self.loops) if not loop.pipelined]
        if unpipelined:
            found.append(f"loop(s) {unpipelined} of {len(self.loops)} not pipelined")
        return found

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def analyse(job: Job, item: Launch, config: Config, compiled: Any, seconds: float) -> KernelReport:
    usage, _ = ptxas_usage(compiled.asm["ptx"], job.arch)
    sass = sass_text(compiled.asm["cubin"], job.arch)
    dump = settings.static_dump_dir()
    if dump:  # the compiled stages, for reading by hand
        stem = dump / f"{job.pattern}.d{job.head_dim}.sm{job.arch}.{item.kernel}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        for suffix, text in (("ttgir", compiled.asm["ttgir"]), ("ptx", compiled.asm["ptx"]), ("sass", sass)):
            stem.with_name(f"{stem.name}.{suffix}").write_text(text)
    return KernelReport(
        pattern=job.pattern,
        kernel=item.kernel,
        arch=job.arch,
        head_dim=job.head_dim,
        dtype=job.dtype,
        config=str(config),
        registers=usage["registers"],
        spill_stores=usage["spill_stores"],
        spill_loads=usage["spill_loads"],
        shared=int(compiled.metadata.shared),
        ptx_wgmma=len(re.findall(r"wgmma\.mma_async", compiled.asm["ptx"])),
        loops=ttgir_loops(compiled.asm["ttgir"]),
        sass_loops=sass_loops(sass),
        compile_s=seconds,
        ptx_tanh=len(re.findall(r"tanh\.approx\.f32", compiled.asm["ptx"])),
    )


def launch_config(item: Launch) -> Config:
    """The configuration a recorded launch was made with (the backward's two kernels have their own)."""
    kw = item.kwargs
    return Config(kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"])


# Kernels a backward call launches that multiply no tiles: not compiled.
_HELPERS = ("attnc_bwd_preprocess",)


def compile_job(job: Job, only: str | None = None) -> list[KernelReport]:
    """Compile the kernels of one job (`only`: the one of that name) and report on each."""
    launches = record(job)
    reports = []
    for item in launches:
        if item.kernel in _HELPERS or only not in (None, item.kernel):
            continue
        start = time.perf_counter()
        compiled = compile_launch(item, job.arch)
        reports.append(analyse(job, item, launch_config(item), compiled, time.perf_counter() - start))
    return reports


def compile_isolated(jobs: list[Job], workers: int = 1, timeout: float | None = None) -> list[dict[str, Any]]:
    """`compile_job` of each job in child processes with Triton's GPU compiler (`TRITON_INTERPRET=0`),
    whatever this process runs kernels with, `workers` of them at once; the reports as JSON dicts, in
    the jobs' order."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    shares = [jobs[i::workers] for i in range(max(1, min(workers, len(jobs))))]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "attnc.testing.static",
                "--jobs",
                json.dumps([_job_json(j) for j in share]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for share in shares
    ]
    results: list[list[list[dict[str, Any]]]] = []
    for child in children:
        out, err = child.communicate(timeout=timeout)
        if child.returncode != 0:
            raise RuntimeError(f"ahead-of-time compilation failed:\n{err[-4000:]}")
        results.append(json.loads(out))
    ordered = [None] * len(jobs)
    for i, share_results in enumerate(results):
        for j, reports in enumerate(share_results):
            ordered[i + j * len(shares)] = reports
    return [report for reports in ordered for report in reports]  # type: ignore[union-attr]


def _job_json(job: Job) -> dict[str, Any]:
    data = asdict(job)
    data["config"] = None if job.config is None else asdict(job.config)
    return data


def _job_of(data: dict[str, Any]) -> Job:
    config = data.get("config")
    return Job(**{**data, "config": None if config is None else Config(**config)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attnc.testing.static", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("patterns", nargs="*", help=f"benchmark patterns ({', '.join(PATTERNS)})")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--arch", type=int, choices=sorted(ARCHS), default=90)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--config", help="BLOCK_M,BLOCK_N,WARPS,STAGES (default: the heuristic's choice)")
    parser.add_argument("--kernel", help="compile only the kernel of this name (e.g. attnc_bwd_dkv)")
    parser.add_argument("--jobs", help=argparse.SUPPRESS)  # JSON: what compile_isolated asks for
    args = parser.parse_args(argv)
    if args.jobs:
        reports = [[r.as_json() for r in compile_job(_job_of(data))] for data in json.loads(args.jobs)]
        print(json.dumps(reports))
        return 0
    config = Config(*(int(x) for x in args.config.split(","))) if args.config else None
    for name in args.patterns or list(bench.PATTERNS):
        job = Job(name, args.dim, args.arch, args.backward, config=config)
        for report in compile_job(job, args.kernel):
            sass = "; ".join(
                f"loop {i}: {loop.instructions} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})"
                for i, (loop, kinds) in enumerate((loop, loop.by_kind) for loop in report.sass_loops)
            )
            problems = report.problems()
            print(
                f"{name} {report.kernel} sm_{report.arch} d{report.head_dim} [{report.config}]: "
                f"{report.registers} registers, spills {report.spill_stores}/{report.spill_loads} bytes, "
                f"{report.shared} bytes shared, {report.compile_s:.1f} s; "
                f"{'ok' if not problems else 'PROBLEMS: ' + '; '.join(problems)}\n  {sass}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
