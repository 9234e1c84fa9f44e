"""attnc's custom op in PyTorch's conventions: a `torch.export`ed program that calls a kernel reloads and
runs in a fresh process (the op names its pattern by IR text, compiled there on first use), autocast
runs fp32 q, k, v in the autocast dtype, and `torch.use_deterministic_algorithms(True)` is honoured for
the gradients of the score's inputs (`attnc/runtime/registry.py`, `attnc/runtime/autograd.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

import attnc
from attnc.ir.printer import print_pattern
from attnc.runtime import autograd, backend, cache, registry
from attnc.runtime.registry import SavedPatternError
from attnc.testing import compare

MOD = attnc.loads(
    """
pattern biased_window(window: int = 8, static sinks: int = 2) {
    input bias: float32[NUM_HEADS, Q_LEN, KV_LEN]
    mask = kv <= q and (q - kv < window or kv < sinks)
    score = s + bias[h, q, kv]
}
"""
)
KERN = MOD.biased_window()
WINDOW = 5  # a runtime value other than the default: the saved program carries it


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    return q, k, v, torch.randn(2, 40, 40, generator=g)


class _Model(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return KERN(q, k, v, bias=bias, window=WINDOW)


# In a new interpreter: nothing of the exporting process but the saved files. `import attnc` registers
# the ops; the cache directory is empty, so the kernels are compiled from the program's pattern text.
_FRESH_PROCESS = """
import sys
import torch
import attnc

root = sys.argv[1]
program = torch.export.load(f"{root}/program.pt2")
q, k, v, bias, dout = torch.load(f"{root}/inputs.pt")
leaves = [t.requires_grad_() for t in (q, k, v, bias)]
out = program.module()(*leaves)
grads = torch.autograd.grad(out, leaves, dout)
torch.save((out.detach(), *grads), f"{root}/results.pt")
"""


@pytest.fixture(scope="module")
def fresh_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, ...]:
    """(out, dq, dk, dv, dbias) of the exported model, saved here and run in a fresh process."""
    root = tmp_path_factory.mktemp("export")
    torch.export.save(torch.export.export(_Model(), _inputs()), root / "program.pt2")
    dout = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(1))
    torch.save((*_inputs(), dout), root / "inputs.pt")
    env = {**os.environ, "ATTNC_CACHE_DIR": str(root / "fresh-cache")}
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(root / "results.pt")


def test_an_exported_program_runs_in_a_fresh_process(fresh_results: tuple[torch.Tensor, ...]) -> None:
    q, k, v, bias = _inputs()
    out = fresh_results[0]
    _, lse = KERN(q, k, v, bias=bias, window=WINDOW, return_lse=True)
    comparison = compare(KERN, out, lse, q, k, v, bias=bias, window=WINDOW)
    assert comparison.ok, comparison.describe()


def test_an_exported_program_differentiates_in_a_fresh_process(
    fresh_results: tuple[torch.Tensor, ...],
) -> None:
    """The backward op finds its kernels by the same pattern text: q, k, v and the bias get the
    gradients this process's kernel gives."""
    leaves = [t.requires_grad_() for t in _inputs()]
    out = KERN(*leaves[:3], bias=leaves[3], window=WINDOW)
    dout = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(out, leaves, dout)
    for got, want in zip(fresh_results[1:], expected, strict=True):
        torch.testing.assert_close(got, want)


def test_the_op_names_its_pattern_by_ir_text_not_by_a_process_key() -> None:
    graph = torch.export.export(_Model(), _inputs()).graph
    (call,) = [n for n in graph.nodes if n.target is torch.ops.attnc.attention.default]
    assert call.args[4] == KERN._op_pattern
    assert call.args[4].startswith("pattern biased_window[sinks=2](window: int = 8) {")


def test_kernels_for_new_runtime_values_share_one_pattern_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pattern is printed once per compiled pattern (for its kernel key, whose text the ops' text
    reuses): a sweep over a runtime value prints nothing more."""
    printed: list[str] = []
    for module, name in ((registry, "print_pattern"), (cache, "pattern_body")):  # the key prints the body
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda p, f=original: printed.append(p.name) or f(p))
    pattern = attnc.loads("pattern swept(window: int = 1) {\n    mask = q - kv < window\n}").swept
    texts = {pattern(window=w)._op_pattern for w in range(1, 9)}
    assert len(texts) == 1 and len(printed) == 1
    assert texts.pop() == print_pattern(pattern(window=3).pattern)


def test_a_pattern_text_this_version_cannot_read_is_a_clear_error() -> None:
    q, k, v, bias = _inputs()
    with pytest.raises(SavedPatternError, match=r"cannot read .*save the program again"):
        torch.ops.attnc.attention(
            q,
            k,
            v,
            [bias],
            "pattern old(window: int) {\n  mask = ???\n}",
            0.25,
            [5],
            autograd.NO_FLOAT_PARAMS,
        )


def test_ir_that_is_not_a_compiled_pattern_is_refused() -> None:
    q, k, v, _ = _inputs()
    uncompiled = MOD.biased_window().ir(after="input")
    with pytest.raises(SavedPatternError, match="not one compiled pattern"):
        torch.ops.attnc.attention(q, k, v, [], uncompiled, 0.25, [], autograd.NO_FLOAT_PARAMS)


# ---- autocast --------------------------------------------------------------------------------------------


def test_fp32_inputs_under_autocast_run_in_the_autocast_dtype() -> None:
    q, k, v, bias = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = KERN(q, k, v, bias=bias, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    half = [t.bfloat16() for t in (q, k, v)]
    comparison = compare(KERN, out, lse, *half, bias=bias)
    assert comparison.ok, comparison.describe()


def test_q_k_v_of_different_float_dtypes_under_autocast_run_in_one_dtype() -> None:
    """As in `scaled_dot_product_attention` under autocast: a float32 q beside bfloat16 k and v (a
    cache, say) is no error, since all three are cast."""
    q, k, v, bias = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = KERN(q, k.bfloat16(), v.half(), bias=bias, return_lse=True)
    comparison = compare(KERN, out, lse, q.bfloat16(), k.bfloat16(), v.half().bfloat16(), bias=bias)
    assert out.dtype == torch.bfloat16 and comparison.ok, comparison.describe()


def test_gradients_under_autocast_come_back_in_the_inputs_dtype() -> None:
    """The casts to bfloat16 are ordinary ops: autograd returns dq, dk, dv as float32 (the bfloat16
    kernel's gradients, widened) and the float32 bias keeps its dtype throughout."""
    leaves = [t.requires_grad_() for t in _inputs()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = KERN(*leaves[:3], bias=leaves[3])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = torch.autograd.grad(out, leaves, dout)
    half = [t.detach().bfloat16().requires_grad_() for t in leaves[:3]]
    bias = leaves[3].detach().requires_grad_()
    expected = torch.autograd.grad(KERN(*half, bias=bias), [*half, bias], dout)
    assert [g.dtype for g in got] == [torch.float32] * 4
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e.float())


# ---- determinism -----------------------------------------------------------------------------------------


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _biased_output_on_a_pretended_gpu(monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, bias), bias requiring grad; then the backward op is told that it runs on the GPU (where the
    input gradients' atomics add in varying order). Its kernels still launch under the interpreter."""
    q, k, v, bias = _inputs()
    bias.requires_grad_()
    out = KERN(q, k, v, bias=bias)
    monkeypatch.setattr(autograd.backend, "active", lambda: backend.CUDA)
    return out, bias


@pytest.mark.usefixtures("restore_determinism")
def test_deterministic_mode_refuses_atomic_input_gradients_on_the_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, _ = _biased_output_on_a_pretended_gpu(monkeypatch)
    torch.use_deterministic_algorithms(True)
    with pytest.raises(
        RuntimeError, match=r"attnc::attention_backward .*'bias' .*not deterministic.*detached"
    ):
        out.sum().backward()


@pytest.mark.usefixtures("restore_determinism")
def test_deterministic_warn_only_warns_and_computes_the_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    out, bias = _biased_output_on_a_pretended_gpu(monkeypatch)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match=r"attnc::attention_backward .*'bias'"):
        out.sum().backward()
    assert bias.grad is not None
