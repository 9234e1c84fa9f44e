"""The runtime's pieces that need no kernel launch: launch configurations, autotuning bookkeeping, the
backend choice and the cache key."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.runtime.errors import OutOfResources

import attnc
from attnc.runtime import autotune, cache
from attnc.runtime.autotune import Config, LaunchShape, Progress, Tuner, heuristic

SHAPE = LaunchShape("bfloat16", 128, 128, 1, 5000, 5000, 32)
H100_SHARED = 232448  # bytes per block, opt-in


def test_shape_buckets_round_lengths_up_to_powers_of_two() -> None:
    assert SHAPE.bucket() == "bfloat16-d128-dv128-g1-q8192-kv8192-bh32"
    assert LaunchShape("bfloat16", 128, 128, 1, 8192, 4097, 32).bucket() == SHAPE.bucket()
    assert LaunchShape("float16", 128, 128, 1, 5000, 5000, 32).bucket() != SHAPE.bucket()


def test_candidates_fit_the_shared_memory() -> None:
    fitting = autotune.candidates(SHAPE, H100_SHARED)
    assert fitting and all(autotune.shared_memory(c, SHAPE) <= H100_SHARED for c in fitting)
    assert len(fitting) < len(autotune.CANDIDATES)  # some need more than an H100 has
    big = LaunchShape("float32", 256, 256, 1, 5000, 5000, 32)
    assert autotune.shared_memory(autotune.heuristic(big, H100_SHARED), big) <= H100_SHARED
    assert autotune.heuristic(SHAPE, H100_SHARED) == Config(128, 64, 8, 3)


def test_shared_memory_estimate() -> None:
    # float16, head dims 24 -> 32 and 40 -> 64: q tile 64 x 32, two stages of K (64 x 32) and V (64 x 64).
    shape = LaunchShape("float16", 24, 40, 1, 100, 100, 1)
    assert autotune.shared_memory(Config(64, 64, 4, 2), shape) == 2 * (64 * 32 + 2 * 64 * (32 + 64))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("32,64", Config(32, 64)), ("128,64,8,3", Config(128, 64, 8, 3)), ("", None), (" ", None)],
)
def test_forced_configuration(monkeypatch: pytest.MonkeyPatch, text: str, expected: Config | None) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", text)
    assert autotune.forced() == expected


@pytest.mark.parametrize("text", ["32", "a,b", "32,48", "8,16", "1,2,3,4,5"])
def test_bad_forced_configuration(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", text)
    with pytest.raises(ValueError, match="ATTNC_CONFIG"):
        autotune.forced()


def test_autotuning_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTNC_AUTOTUNE", raising=False)
    assert autotune.autotuning_enabled()
    monkeypatch.setenv("ATTNC_AUTOTUNE", "0")
    assert not autotune.autotuning_enabled()


def test_tuner_keeps_the_fastest_and_persists_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    configs = [Config(64, 32), Config(128, 64), Config(64, 64)]
    times = {Config(64, 32): 3.0, Config(128, 64): 1.0, Config(64, 64): 2.0}
    measured: list[Config] = []

    def measure(config: Config) -> float:
        measured.append(config)
        return times[config]

    tuner = Tuner("k" * 64, "NVIDIA H100 80GB HBM3 sm90")
    assert tuner.tune(SHAPE, configs, measure, "p", io.StringIO()) == Config(128, 64)
    assert measured == configs
    saved = json.loads(tuner.path.read_text())
    assert saved == {SHAPE.bucket(): {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 2}}
    assert tuner.path.name == "k" * 64 + ".NVIDIA-H100-80GB-HBM3-sm90.json"
    # A new process (a new Tuner) reuses the result without measuring.
    again = Tuner("k" * 64, "NVIDIA H100 80GB HBM3 sm90")
    assert again.tune(SHAPE, configs, lambda c: pytest.fail("measured again"), "p") == Config(128, 64)


def test_a_configuration_that_fails_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))

    def measure(config: Config) -> float:
        if config.block_m == 128:
            raise OutOfResources(232448, 227000, "shared memory")
        return 1.0

    chosen = Tuner("a" * 64, "gpu").tune(
        SHAPE, [Config(128, 128), Config(64, 64)], measure, "p", io.StringIO()
    )
    assert chosen == Config(64, 64)
    with pytest.raises(RuntimeError, match="no launch configuration ran") as failure:
        Tuner("b" * 64, "gpu").tune(SHAPE, [Config(128, 128)], measure, "p", io.StringIO())
    assert isinstance(failure.value.__cause__, OutOfResources)  # the device's reason is kept


def test_any_other_error_while_tuning_is_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))

    def measure(config: Config) -> float:
        raise ValueError("a bug in a launch")

    with pytest.raises(ValueError, match="a bug in a launch"):
        Tuner("c" * 64, "gpu").tune(SHAPE, [Config(64, 64)], measure, "p", io.StringIO())


def test_backward_heuristics_give_dq_and_dkv_tiles_of_their_own_which_fit_the_registers() -> None:
    # dQ: 128 query rows on wgmma (its M side), each warp group on 64 of them. dK/dV: on wgmma, 128-key
    # tiles at head dims 64 and 128 (64 keys at 128 for an analytic plan of several conjuncts, whose
    # ranges push 128 over); at 256 64-key tiles spill (their two [64, 256] accumulators), so 32-key
    # tiles with 32-query tiles, which keep two tiles in flight (tests/test_static_sm90.py compiles
    # these choices with ptxas for sm_90).
    def shape(dim: int) -> LaunchShape:
        return LaunchShape("bfloat16", dim, dim, 1, 4096, 4096, 32)

    assert heuristic(shape(64), 227 * 1024, backward=True) == Config(128, 32, 8, 3)
    assert heuristic(shape(128), 227 * 1024, backward=True) == Config(128, 32, 8, 3)
    assert heuristic(shape(256), 227 * 1024, backward=True) == Config(128, 16, 8, 3)
    assert heuristic(shape(64), 227 * 1024, dkv=True) == Config(16, 128, 8, 3)
    assert heuristic(shape(128), 227 * 1024, dkv=True) == Config(16, 128, 8, 3)
    assert heuristic(shape(128), 227 * 1024, dkv=True, conjuncts=2) == Config(16, 64, 8, 3)
    assert heuristic(shape(128), 227 * 1024, dkv=True, conjuncts=4) == Config(32, 32, 8, 3)
    assert heuristic(shape(256), 227 * 1024, dkv=True) == Config(32, 32, 8, 3)
    # 128-key tiles are for sm_90's warp-group products: on an A100 (mma.sync) 64-key tiles.
    assert heuristic(shape(128), 163 * 1024, dkv=True, arch=80) == Config(16, 64, 8, 3)
    for dim in (64, 256):  # there one choice serves every plan
        assert heuristic(shape(dim), 227 * 1024, dkv=True, conjuncts=2) == heuristic(
            shape(dim), 227 * 1024, dkv=True
        )


def test_a_devices_limits_name_its_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from attnc.runtime import launch

    props = SimpleNamespace(name="NVIDIA H100", major=9, minor=0, shared_memory_per_block_optin=232448)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.version, "hip", None)
    assert launch._device_limits.__wrapped__(0) == ("NVIDIA H100 sm90", 232448, 90)
    monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm: no NVIDIA architecture
    assert launch._device_limits.__wrapped__(0).arch == 0


def test_progress_bar_appears_only_on_long_tuning() -> None:
    quick = io.StringIO()
    progress = Progress(3, "attnc: autotuning p", quick, delay_s=60.0)
    for _ in range(3):
        progress.step()
    progress.close()
    assert quick.getvalue() == ""
    slow = io.StringIO()
    progress = Progress(4, "attnc: autotuning p", slow, delay_s=0.0)
    for _ in range(4):
        progress.step()
    progress.close()
    lines = slow.getvalue().split("\r")
    assert lines[-1].startswith("attnc: autotuning p [" + "#" * 30 + "] 4/4 (")
    assert "] 2/4" in slow.getvalue() and slow.getvalue().endswith(" s)\n")


def test_the_template_text_is_part_of_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kern = attnc.stdlib().causal()
    key = cache.kernel_key(kern.pattern, kern._compiled.spec, "attention_fwd.py.jinja")
    edited = tmp_path / "attention_fwd.py.jinja"
    edited.write_text((cache.TEMPLATES / "attention_fwd.py.jinja").read_text() + "\n# edited\n")
    monkeypatch.setattr(cache, "TEMPLATES", tmp_path)
    assert cache.kernel_key(kern.pattern, kern._compiled.spec, "attention_fwd.py.jinja") != key


def test_without_a_gpu_import_chooses_the_interpreter() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even on a machine that has one
    code = (
        "import os, attnc; from attnc.runtime import backend; "
        "print(os.environ.get('TRITON_INTERPRET'), backend.active())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "interpreter"]
    env["TRITON_INTERPRET"] = "0"  # the user's choice stands
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "cuda"]


def test_float32_tiles_multiply_as_pytorchs_matmuls(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnc.runtime.backend import INTERPRETER
    from attnc.runtime.launch import dot_precision

    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert dot_precision(torch.float32, "cuda") == "ieee"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert dot_precision(torch.float32, "cuda") == "tf32"
    assert dot_precision(torch.float32, INTERPRETER) == "ieee"
