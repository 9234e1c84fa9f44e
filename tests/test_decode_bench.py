"""`benchmarks/decode.py --smoke`: every decode case of the benchmark, at tiny sizes on the CPU, checked
against the dense reference (the GPU run times the same cases after the same checks)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("decode_benchmark", ROOT / "benchmarks" / "decode.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_smoke_run_checks_every_pattern_and_query_length(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    assert load_benchmark().main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    cases = report["cases"]
    assert {c["pattern"] for c in cases} == {"causal", "sliding_window_24", "streaming_llm_24_4"}
    assert {c["q_len"] for c in cases} == {1, 4}
    assert all(r["passed"] for c in cases for r in c["results"])
    assert {r["system"] for c in cases for r in c["results"]} == {"attnc", "sdpa"}


def test_a_spent_time_budget_records_the_remaining_cases_as_skipped(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    assert load_benchmark().main(["--smoke", "--time-budget-s", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["cases"] == []
    assert len(report["skipped"]) == 3 * 2 * 2  # patterns x query lengths x contexts
