"""Kernel build time: `.attn` pattern to Triton source, in a warm process, without Triton's own compile.

What a user waits for between `mod.pattern(...)` and a kernel they can call (DESIGN.md section 8:
"<= 5 ms for StreamingLLM, <= 50 ms for any stdlib or example pattern"), and how many kernels a
parameter sweep renders ("all values of a runtime parameter share one compiled kernel").

Method:

1. **Build time.** One worker process parses every file once (`attnc.load`, not timed) and builds one
   kernel first, so that imports, the grammar and the Jinja templates are warm. Then, for every stdlib
   pattern (at the parameter values below) and every pattern of `examples/*.attn` (at its defaults),
   each repetition empties the in-memory source cache and the memo of compiled pipelines, points
   `ATTNC_CACHE_DIR` at a new empty directory and times `module[name](**params)`: the whole pipeline
   (inline ... fuse), the kernel spec, the Jinja render and its write to the disk cache. The source is
   parsed and its structure checked where it is loaded, not here: `+ load ms` times that step apart
   (`checked_code` on the forward source: what a first call adds before Triton's own compile). The
   median of `--reps` is reported, with the minimum, the maximum and the first build (the only one
   whose IR nodes no earlier build of the same pattern made), and per pass (its verification included;
   `lower-triton` is the rest: the kernel spec, the cache key, the render and the write, and since
   issue16-r5 the `inline` that deciding the static parameters runs before the pipeline, whose
   `inline` stage then takes that module). Nothing here runs Triton's compiler or a kernel.
2. **Programs whose DAG is small and whose tree is exponential** (a 40-deep chain of `fn`s each using
   its argument twice; 60 `let`s each squaring the last): each in its own process with a timeout
   (`--stress-timeout`, default 60 s), timed the same way; a timeout or an error is recorded as such.
3. **Parameter sweeps.** `sliding_window(window=w)` for 32 values of w and `streaming_llm` for 8
   (window, sinks) pairs, in a fresh cache: the number of forward kernel sources rendered (cache misses).
4. **The host.** Hosts sold under one name differ (the same code's streaming_llm build took 6.8 ms on
   the host of issue16-r7 and 2.9 ms on that of issue16-r8, both "AMD EPYC", 2 cores): from issue16-r8
   a run keeps the CPU's family, model and clock, the commit, and the milliseconds of a fixed
   pure-Python workload (`_calibration_ms`), by which two runs' hosts compare.

Usage::

    python benchmarks/build_time.py                       # everything; JSON under benchmarks/results/
    python benchmarks/build_time.py --label before --reps 3
    python benchmarks/build_time.py --only streaming_llm --only neighborhood_3d  # some patterns only
    python benchmarks/build_time.py --markdown FILE.json  # the README table of a saved run
    python benchmarks/build_time.py --markdown FILE.json --breakdown  # and the per-pass table

Results: `benchmarks/results/build_time-<label>-<cpu>-<date>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def stress_sources() -> dict[str, str]:
    """Programs of a few dozen DAG nodes whose expression trees have 2^40 and 2^60 leaves."""
    fns = ["fn f0(x: int) = x + 1"]
    fns += [f"fn f{i}(x: int) = (f{i - 1}(x) + f{i - 1}(x)) % 1000003" for i in range(1, 40)]
    doubling = "\n".join(fns) + "\npattern p { mask = f39(q - kv) >= 0 }\n"
    lets = ["    let a0 = q - kv"]
    lets += [f"    let a{i} = a{i - 1} * a{i - 1} % 1000003" for i in range(1, 60)]
    squaring = "pattern p {\n" + "\n".join(lets) + "\n    mask = a59 >= 0\n}\n"
    return {"fn_doubling_40": doubling, "let_squaring_60": squaring}


def _fresh_cache() -> None:
    from attnc import api
    from attnc.runtime import cache

    cache.clear_memory()
    api.clear_memory()  # the compiled pipelines of each loaded program: a repetition runs every pass
    previous = os.environ.get("ATTNC_CACHE_DIR", "")
    if Path(previous).name.startswith("attnc-build-time-"):  # this worker's last one (not timed)
        shutil.rmtree(previous, ignore_errors=True)
    os.environ["ATTNC_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnc-build-time-")


def _time_build(
    module, name: str, params: dict, reps: int
) -> tuple[list[float], list[dict[str, float]], list[float]]:
    """The seconds of each build, of each pass in it (`lower-triton`: the rest of the build), and of
    checking and compiling the forward kernel's source into Python code where it is loaded (not part of
    the build: what a first call adds before Triton's own compile)."""
    from attnc.codegen.lower import checked_code

    times, passes, loads = [], [], []
    for _ in range(reps):
        _fresh_cache()
        start = time.perf_counter()
        kernel = module[name](**params)
        times.append(time.perf_counter() - start)
        seconds = dict(kernel._compiled.passes.seconds)
        seconds["lower-triton"] = times[-1] - sum(seconds.values())
        passes.append(seconds)
        source = kernel._compiled.source
        start = time.perf_counter()
        checked_code(source.text, source.spec, source.template, str(source.path))
        loads.append(time.perf_counter() - start)
    return times, passes, loads


def _summary(times: list[float], passes: list[dict[str, float]], loads: list[float]) -> dict:
    return {
        "load_median_ms": statistics.median(loads) * 1e3,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "first_ms": times[0] * 1e3,
        "passes_ms": {stage: statistics.median(p[stage] for p in passes) * 1e3 for stage in passes[0]},
        "times_s": times,
    }


def _selected(source: str, name: str, only: list[str] | None) -> bool:
    return not only or name in only or f"{source}:{name}" in only


def worker_patterns(reps: int, only: list[str] | None) -> list[dict]:
    import attnc
    from attnc.testing import kernel_lines

    stdlib = attnc.stdlib()
    _fresh_cache()
    stdlib.causal()  # warm-up: imports, grammar, templates
    # The stdlib at its benchmark parameters: those `python -m attnc.testing.kernel_lines` renders.
    params = kernel_lines.STDLIB_PARAMS[1]
    cases = [("stdlib", stdlib, name, params.get(name, {})) for name in stdlib.patterns]
    for path in sorted((ROOT / "examples").glob("*.attn")):
        module = attnc.load(path)
        cases += [(f"examples/{path.name}", module, name, {}) for name in module.own_patterns]
    rows = []
    for source, module, name, params in cases:
        if not _selected(source, name, only):
            continue
        rows.append(
            {
                "source": source,
                "pattern": name,
                "params": params,
                **_summary(*_time_build(module, name, params, reps)),
            }
        )
        print(f"{source}:{name} {rows[-1]['median_ms']:.1f} ms", file=sys.stderr)
    return rows


def worker_stress(name: str, reps: int) -> dict:
    import attnc

    _fresh_cache()
    attnc.stdlib().causal()
    module = attnc.loads(stress_sources()[name], filename=f"<{name}>")
    return {"source": "stress", "pattern": name, **_summary(*_time_build(module, "p", {}, reps))}


def worker_sweeps() -> list[dict]:
    import attnc
    from attnc.runtime import cache

    stdlib = attnc.stdlib()
    streaming = attnc.load(ROOT / "examples" / "streaming_llm.attn")
    sweeps = [
        ("sliding_window(window=w), 32 values", lambda i: stdlib.sliding_window(window=64 * (i + 1)), 32),
        (
            "streaming_llm(window, sinks), 8 pairs",
            lambda i: streaming.streaming_llm(window=256 * (i + 1), sinks=1 + i % 4),
            8,
        ),
    ]
    rows = []
    for label, make, count in sweeps:
        _fresh_cache()
        before = cache.STATS.renders
        for i in range(count):
            make(i)
        rows.append(
            {"sweep": label, "kernels_built": count, "sources_rendered": cache.STATS.renders - before}
        )
    return rows


def _run_worker(args: list[str], timeout: float) -> dict:
    command = [sys.executable, __file__, "--worker", *args]
    try:
        # The checkout this script lies in, whatever attnc the interpreter would otherwise import.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        reason = next(
            (line for line in reversed(lines) if "error" in line.lower()), f"exit {done.returncode}"
        )
        return {"status": f"error: {reason.strip()}"}
    return {"status": "ok", "result": json.loads(done.stdout.strip().splitlines()[-1])}


def markdown(report: dict, breakdown: bool = False) -> str:
    lines = [
        f"Kernel build time (`.attn` to Triton source, warm process), median of {report['reps']}, "
        f"{report['cpu']}, {report['date']}, attnc {report['attnc']} ({report['label']})",
        *_host_line(report),
        "",
        "| pattern | median ms | min ms | max ms | first ms | + load ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["patterns"] + report["stress"]:
        name = f"{row['source']}:{row['pattern']}"
        if "median_ms" in row:
            first = f"{row['first_ms']:.1f}" if "first_ms" in row else ""  # not in runs before it was kept
            load = f"{row['load_median_ms']:.1f}" if "load_median_ms" in row else ""  # likewise
            times = f"{row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['max_ms']:.1f} | {first} | {load}"
            lines.append(f"| {name} | {times} |")
        else:
            lines.append(f"| {name} | {row['status']} | | | | |")
    if report["sweeps"]:
        lines += ["", "| parameter sweep | kernels built | Triton sources rendered |", "|---|---:|---:|"]
        lines += [
            f"| {s['sweep']} | {s['kernels_built']} | {s['sources_rendered']} |" for s in report["sweeps"]
        ]
    if breakdown:
        lines += ["", *_breakdown(report["patterns"] + report["stress"])]
    return "\n".join(lines)


def _host_line(report: dict) -> list[str]:
    """The host's family/model and its calibration figure, where the run kept them (from issue16-r8)."""
    if "calibration_ms" not in report:
        return []
    cpu = report.get("cpu_fields", {})
    ident = ", ".join(f"{key} {cpu[key]}" for key in ("cpu family", "model", "cpu MHz") if key in cpu)
    return [
        "",
        f"Host: {ident or 'unknown'}; calibration workload {report['calibration_ms']:.1f} ms "
        f"(`_calibration_ms`: compare hosts by it); commit {report.get('commit') or 'unknown'}.",
    ]


def _breakdown(rows: list[dict]) -> list[str]:
    """Per pass, the median ms (a pass with its verification; `lower-triton` is the rest of the build)."""
    timed = [row for row in rows if "passes_ms" in row]
    if not timed:
        return []
    stages = list(timed[0]["passes_ms"])
    lines = [f"| pattern | {' | '.join(stages)} |", "|---|" + "---:|" * len(stages)]
    for row in timed:
        cells = " | ".join(f"{row['passes_ms'].get(stage, 0.0):.1f}" for stage in stages)
        lines.append(f"| {row['source']}:{row['pattern']} | {cells} |")
    return lines


def _cpu_name() -> str:
    return _cpu_fields().get("model name") or platform.processor() or platform.machine()


def _cpu_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's lines of /proc/cpuinfo (or of `cpuinfo`) that tell one host from another
    ("AMD EPYC" names several generations: its family and model do not); empty without that file."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    wanted = ("model name", "cpu family", "model", "stepping", "cpu MHz", "cache size")
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if not key and fields:
            break  # the end of the first processor's block
        if key in wanted:
            fields[key] = value.strip()
    return fields


def _calibration_ms(reps: int = 7) -> float:
    """Median milliseconds of a fixed pure-Python workload (tuple keys, dict lookups, small calls and
    strings, as the compiler spends its time): two hosts' build times compare through this ratio, as
    the same code on another host of the same name can take twice as long."""

    def work() -> int:
        table: dict[tuple[int, int, int], int] = {}
        for i in range(20000):
            key = (i % 97, i % 89, i >> 5)
            table[key] = table.get(key, 0) + len(str(i))
        return len(sorted(table.items()))

    times = []
    for _ in range(reps):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _commit() -> str:
    """The checkout's commit, `+` where its tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--label", default="current")
    parser.add_argument("--stress-timeout", type=float, default=60.0)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="print the table of a saved run")
    parser.add_argument("--breakdown", action="store_true", help="with the table, the per-pass one")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="time only this pattern (a name, or SOURCE:NAME as in the table; repeatable); no sweeps",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "patterns":
            result = worker_patterns(args.reps, args.only)
        elif kind == "stress":
            result = worker_stress(rest[0], args.reps)
        else:
            result = worker_sweeps()
        print(json.dumps(result))
        return
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text()), args.breakdown))
        return

    import attnc

    timeout = max(args.stress_timeout * args.reps, 600.0)
    only = [flag for name in args.only or () for flag in ("--only", name)]
    patterns = _run_worker(["patterns", "--reps", str(args.reps), *only], timeout)
    if patterns["status"] != "ok":
        raise SystemExit(f"build_time: the pattern worker failed: {patterns['status']}")
    stress = []
    for name in stress_sources():
        if not _selected("stress", name, args.only):
            continue
        done = _run_worker(["stress", name, "--reps", str(args.reps)], args.stress_timeout * args.reps)
        stress.append(
            done["result"]
            if done["status"] == "ok"
            else {"source": "stress", "pattern": name, "status": done["status"]}
        )
    sweeps = _run_worker(["sweeps"], 600.0) if not args.only else {"status": "ok", "result": []}
    report = {
        "label": args.label,
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_name(),
        "cpu_fields": _cpu_fields(),
        "calibration_ms": _calibration_ms(),
        "commit": _commit(),
        "cores": os.cpu_count(),
        "attnc": attnc.__version__,
        "python": platform.python_version(),
        "reps": args.reps,
        "load_average": os.getloadavg(),
        "patterns": patterns["result"],
        "stress": stress,
        "sweeps": sweeps.get(
            "result", [{"sweep": "all", "kernels_built": 0, "sources_rendered": sweeps["status"]}]
        ),
    }
    cpu = "-".join(_cpu_name().lower().split()[:3]).replace("/", "")
    output = args.output or RESULTS / f"build_time-{args.label}-{cpu}-{report['date']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report, args.breakdown))
    print(f"\nwritten {output}")


if __name__ == "__main__":
    main()
