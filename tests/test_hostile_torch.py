"""Hostile use of the PyTorch integration (issue 15, reliability-probe rows 4, 5, 7, 13, 20, 21, 22, 26
and 31): forward-mode AD and double backward fail loudly, dynamic shapes compile once, bad scales and
dense results too large to allocate are `InputError`s, threads share a kernel under the interpreter,
zero batches and heads give empty results, and input names cannot collide with the calls' keywords."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from cases import DEVICE, compile_counter
from torch.autograd import forward_ad

import attnc
from attnc import InputError, api
from attnc.api import DENSE_LIMIT, Kernel, Pattern
from attnc.reserved import RESERVED_NAMES, RESERVED_PARAMETER_NAMES, RESERVED_RUNTIME_PARAMETER_NAMES

ROOT = Path(__file__).resolve().parents[1]
CAUSAL = attnc.stdlib().causal()
DOC = attnc.load(ROOT / "examples" / "document_causal.attn").document_causal()
BIAS = attnc.loads("pattern biased {\n    input bias: float32[KV_LEN]\n    score = s + bias[kv]\n}").biased()
FORWARD_AD = "reverse-mode autograd only; forward-mode AD"


def _qkv(length: int = 8, *shape: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    size = shape or (1, 1, length, 16)
    return tuple(torch.randn(*size, generator=g).to(DEVICE) for _ in range(3))


def _docs(length: int) -> torch.Tensor:
    return (torch.arange(length, dtype=torch.int32, device=DEVICE) // 3)[None]


# Row 4: forward-mode AD has no rule; it must raise, never return a zero tangent.


def test_jvp_raises_instead_of_a_zero_tangent() -> None:
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=FORWARD_AD):
        torch.func.jvp(lambda a: CAUSAL(a, k, v), (q,), (torch.randn_like(q),))


def test_jacfwd_raises_instead_of_a_zero_jacobian() -> None:
    q, k, v = _qkv(4)
    with pytest.raises(NotImplementedError, match=FORWARD_AD):
        torch.func.jacfwd(lambda a: CAUSAL(q, k, a))(v)


def test_forward_ad_dual_value_raises() -> None:
    q, k, v = _qkv()
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=FORWARD_AD):
        CAUSAL(q, k, forward_ad.make_dual(v, torch.randn_like(v)))


def test_forward_ad_dual_input_tensor_raises() -> None:
    q, k, v = _qkv()
    bias = torch.randn(8, device=DEVICE)
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=FORWARD_AD):
        BIAS(q, k, v, bias=forward_ad.make_dual(bias, torch.randn_like(bias)))


# Row 22: double backward says that the kernels are differentiable once.


def test_double_backward_says_differentiable_once() -> None:
    q, k, v = _qkv()
    q.requires_grad_()
    (grad,) = torch.autograd.grad(CAUSAL(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="attnc kernels are differentiable once"):
        grad.sum().backward()


# Row 7: shape checks are symbolic-shape safe, so inputs sized by a length compile once.


def _compiled_document_masking(dynamic: bool | None) -> tuple[Any, Any]:
    counter = compile_counter()
    return counter, torch.compile(
        lambda q, k, v, d: DOC(q, k, v, doc=d), fullgraph=True, backend=counter, dynamic=dynamic
    )


@pytest.mark.parametrize(
    ("dynamic", "lengths", "frames"),
    [
        # The probe's reproduction: L=8 then L=9 raised a data-dependent guard error from the input-shape
        # check. Now the second length recompiles once, as dynamic, and later lengths reuse that graph.
        (None, (8, 9, 10, 12), 2),
        (True, (8, 9, 12), 1),
    ],
    ids=["fullgraph-survives-new-lengths", "dynamic-compiles-once"],
)
def test_compile_document_masking(dynamic: bool | None, lengths: tuple[int, ...], frames: int) -> None:
    counter, f = _compiled_document_masking(dynamic)
    for length in lengths:
        q, k, v = _qkv(length)
        d = _docs(length)
        torch.testing.assert_close(f(q, k, v, d), DOC.reference(q, k, v, doc=d))
    assert counter.frame_count == frames


def test_compile_dynamic_document_masking_gradients() -> None:
    _, f = _compiled_document_masking(True)
    for length in (8, 11):
        q, k, v = (t.requires_grad_() for t in _qkv(length))
        d = _docs(length)
        grads = torch.autograd.grad(f(q, k, v, d).square().sum(), (q, k, v))
        expected = torch.autograd.grad(DOC.reference(q, k, v, doc=d).square().sum(), (q, k, v))
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_compile_dynamic_shape_arithmetic_compiles_once() -> None:
    kern = attnc.loads(
        "pattern p {\n"
        "    input w: float32[max(Q_LEN, KV_LEN) // 2 + abs(Q_LEN - KV_LEN - 1) % 3 + min(Q_LEN, 0)]\n"
        "    score = s + w[q // 2]\n"
        "}"
    ).p()
    counter = compile_counter()
    f = torch.compile(lambda q, k, v, w: kern(q, k, v, w=w), fullgraph=True, backend=counter, dynamic=True)
    for length in (8, 9, 13):
        q, k, v = _qkv(length)
        w = torch.randn(length // 2 + 1, device=DEVICE)
        torch.testing.assert_close(f(q, k, v, w), kern.reference(q, k, v, w=w))
    assert counter.frame_count == 1


# Values that are never negative: a negative dimension may become a declaration error.
@pytest.mark.parametrize(
    "dim",
    [
        "(Q_LEN - 20) // 3 + 7",
        "(Q_LEN - 20) % 3",
        "Q_LEN // (KV_LEN % 8)",
        "Q_LEN % (KV_LEN % 8)",
        "-Q_LEN // 4 + Q_LEN",
    ],
)
def test_shape_arithmetic_matches_the_oracle(dim: str) -> None:
    """The shape check's integer evaluator has the language's semantics: floor division, `x // 0 = 0`,
    `x % 0 = x`."""
    kern = attnc.loads(f"pattern p {{\n    input w: float32[{dim}]\n    score = s + w[0]\n}}").p()
    node = kern._bound.inputs[0].dims[0]
    sizes = {"BATCH": None, "NUM_HEADS": None, "Q_LEN": 7, "KV_LEN": 8}
    assert api._dim_value(node, sizes) == api._dim_by_oracle(node, {"Q_LEN": 7, "KV_LEN": 8})


def test_compile_dynamic_still_checks_input_shapes() -> None:
    """A graph traced for one length checks the next length's input shape (the check's error is raised
    when the graph runs: tests/test_compile_errors.py)."""
    compile_counter()
    f = torch.compile(lambda q, k, v, d: DOC(q, k, v, doc=d), backend="aot_eager", dynamic=True)
    q, k, v = _qkv(8)
    f(q, k, v, _docs(8))
    q, k, v = _qkv(9)
    with pytest.raises(InputError, match=r"input 'doc' must have shape \[1, 9\], got \[1, 8\]"):
        f(q, k, v, _docs(8))


# Row 5: a scale the float32 kernels cannot hold is an InputError, not a NaN output.


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), 1e39, -1e300])
def test_scale_must_be_finite_in_float32(scale: float) -> None:
    q, k, v = _qkv()
    with pytest.raises(InputError, match=r"scale must be finite and at most 3\.402823e\+38"):
        CAUSAL(q, k, v, scale=scale)
    with pytest.raises(InputError, match="scale must be finite"):
        CAUSAL.reference(q, k, v, scale=scale)


def test_largest_float32_scale_is_accepted() -> None:
    q, k, v = _qkv()
    out = CAUSAL(q * 0, k, v, scale=float(torch.finfo(torch.float32).max))  # zero scores stay finite
    torch.testing.assert_close(out, CAUSAL.reference(q * 0, k, v))


# Row 26: dynamo specialises a float scale (one graph per value); the documented way to change the
# scale every step folds it into q, which compiles once.


def test_changing_scale_folded_into_q_compiles_once() -> None:
    counter = compile_counter()
    f = torch.compile(lambda q, k, v, t: CAUSAL(q * t, k, v, scale=1.0), fullgraph=True, backend=counter)
    q, k, v = _qkv()
    for t in (0.1, 0.2, 0.3, 0.4):
        torch.testing.assert_close(
            f(q, k, v, torch.tensor(t, device=DEVICE)), CAUSAL.reference(q, k, v, scale=t)
        )
    assert counter.frame_count == 1


# Row 20: Triton's interpreter is not thread-safe; attnc serialises its launches.


def test_four_threads_share_one_kernel_under_the_interpreter() -> None:
    q, k, v = _qkv(40)
    expected = CAUSAL.reference(q, k, v)
    CAUSAL(q, k, v)  # compiled once before the threads start
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(3):
            try:
                results.append(CAUSAL(q, k, v))
            except BaseException as err:  # collected: a thread's exception would otherwise be lost
                errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 12
    for out in results:
        torch.testing.assert_close(out, expected)


# Row 21: dense results past DENSE_LIMIT elements are refused before anything is allocated.


def test_huge_mask_is_refused_before_allocating() -> None:
    with pytest.raises(InputError, match=r"the mask would have 4611686018427387904 elements .*DENSE_LIMIT"):
        CAUSAL.mask(2**31, 2**31)


def test_huge_block_map_is_refused_before_allocating() -> None:
    with pytest.raises(InputError, match=r"the block map would have \d+ elements"):
        CAUSAL.block_map(10**9, 10**9)


def test_huge_reference_scores_are_refused_before_allocating() -> None:
    q = torch.zeros(1, 1, 50_000, 1, device=DEVICE)
    assert DENSE_LIMIT < 50_000**2
    with pytest.raises(InputError, match="the reference's scores would have 2500000000 elements"):
        CAUSAL.reference(q, q, q)


def test_mask_at_the_limit_of_batches_counts_them() -> None:
    with pytest.raises(InputError, match=r"\[4, 1, 32768, 32768\]"):
        CAUSAL.mask(2**15, 2**15, batch=4)


def test_huge_plan_stays_analytic() -> None:
    assert CAUSAL.plan(2**40, 2**40).sparsity == "analytic"


# Row 31: zero batch rows or heads are accepted, like zero lengths: empty results.


@pytest.mark.parametrize("shape", [(0, 1, 8, 16), (1, 0, 8, 16), (0, 0, 8, 16)])
def test_zero_batch_or_heads_give_empty_results(shape: tuple[int, ...]) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(8, *shape))
    d = torch.zeros(shape[0], 8, dtype=torch.int32, device=DEVICE)
    out, lse = DOC(q, k, v, return_lse=True, doc=d)
    assert out.shape == shape and lse.shape == shape[:3]
    assert DOC.reference(q, k, v, doc=d).shape == shape
    (out.sum() + lse.sum()).backward()
    assert q.grad is not None and q.grad.shape == shape


def test_zero_batch_mask_and_block_map_are_empty() -> None:
    assert CAUSAL.mask(8, 8, batch=0, num_heads=2).shape == (0, 2, 8, 8)
    assert CAUSAL.block_map(8, 8, block=(4, 4), batch=2, num_heads=0).shape == (2, 0, 2, 2)


def test_negative_batch_is_still_rejected() -> None:
    with pytest.raises(InputError, match="batch must be a non-negative int, got -1"):
        CAUSAL.mask(8, 8, batch=-1)


def test_zero_key_heads_with_query_heads_is_still_rejected() -> None:
    q, _, _ = _qkv(8, 1, 2, 8, 16)
    k = torch.zeros(1, 0, 8, 16, device=DEVICE)
    with pytest.raises(InputError, match="must be a multiple of key/value heads"):
        CAUSAL(q, k, k)


# Row 13: the calls' keywords are reserved in one place, which cannot drift from the API.


def _keywords(cls: type) -> set[str]:
    names = set()
    for attr, member in vars(cls).items():
        if callable(member) and (not attr.startswith("_") or attr == "__call__"):
            for p in inspect.signature(member).parameters.values():
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                    names.add(p.name)
    return names


def test_reserved_names_cover_every_kernel_keyword() -> None:
    keywords = _keywords(Kernel)
    assert {"q", "scale", "return_lse", "q_len", "batch", "block", "device", "precision"} <= keywords
    assert keywords <= RESERVED_NAMES


def test_reserved_parameter_names_cover_the_pattern_call() -> None:
    assert _keywords(Pattern) == {"self"} <= RESERVED_PARAMETER_NAMES
    assert RESERVED_PARAMETER_NAMES <= RESERVED_NAMES


def test_reserved_runtime_parameter_names_cover_every_kernel_keyword() -> None:
    """A runtime parameter's value may be given to any `Kernel` call by keyword, as an input is."""
    assert _keywords(Kernel) | RESERVED_PARAMETER_NAMES <= RESERVED_RUNTIME_PARAMETER_NAMES


def test_reserved_names_include_the_designed_keywords() -> None:
    designed = {"plan", "q_offset", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "k_cache"}
    assert (
        designed | {"v_cache", "cache_seqlens", "block_table", "kernel_options", "return_aux"}
        <= RESERVED_NAMES
    )


def test_reserved_module_imports_without_torch() -> None:
    path = ROOT / "attnc" / "reserved.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('reserved', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert 'torch' not in sys.modules and 'scale' in module.RESERVED_NAMES\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert importlib.util.find_spec("attnc.reserved") is not None
