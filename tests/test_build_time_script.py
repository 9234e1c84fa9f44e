"""`benchmarks/build_time.py` keeps what tells its host apart: the first processor's family, model and
clock, a calibration figure and the commit, in its JSON and in the header of its table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "build_time.py"
SPEC = importlib.util.spec_from_file_location("build_time_benchmark", SCRIPT)
assert SPEC is not None and SPEC.loader is not None
build_time = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(build_time)

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
cpu MHz\t\t: 2596.122

processor\t: 1
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
cpu MHz\t\t: 1800.000
"""


def test_cpu_fields_are_the_first_processors() -> None:
    assert build_time._cpu_fields(CPUINFO) == {
        "cpu family": "26",
        "model": "2",
        "model name": "AMD EPYC",
        "stepping": "1",
        "cpu MHz": "2596.122",
    }


def test_table_header_names_the_host_where_the_run_kept_it(tmp_path: Path) -> None:
    output = tmp_path / "run.json"
    command = [sys.executable, str(SCRIPT), "--only", "causal", "--reps", "1", "--output", str(output)]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    report = json.loads(output.read_text())
    assert report["calibration_ms"] > 0
    assert report["cpu_fields"] == build_time._cpu_fields()
    assert [row["pattern"] for row in report["patterns"]] == ["causal"]
    header = build_time.markdown(report).splitlines()[2]
    assert header.startswith("Host: ") and f"calibration workload {report['calibration_ms']:.1f} ms" in header
    older = {key: value for key, value in report.items() if key not in ("calibration_ms", "cpu_fields")}
    assert not any(line.startswith("Host: ") for line in build_time.markdown(older).splitlines())
