"""A call's argument errors under `torch.compile`: the same type and located message as uncompiled.

Dynamo lets no exception leave a trace (with `fullgraph=True` it reports its own `Unsupported`), so a
traced `Kernel` call puts its error in the graph (`attnc::raise_error`), which raises it when the graph
runs. The judge is the uncompiled call's error: its type and its whole message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from cases import DEVICE, compile_counter

import attnc
from attnc.errors import AttnError

CAUSAL = attnc.stdlib().causal()
CHECKED = attnc.loads(
    "pattern p(window: int = 4, temperature: float = 1.0) {\n"
    "    input doc: int32[BATCH, KV_LEN]\n"
    "    mask = doc[b, q] == doc[b, kv] and q - kv < window\n"
    "    score = s / temperature\n"
    "}"
).p()


def _qkv(length: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, length, 16, generator=g).to(DEVICE) for _ in range(3))


def _docs(length: int = 8) -> torch.Tensor:
    return (torch.arange(length, dtype=torch.int32, device=DEVICE) // 3)[None]


def _packed(q: torch.Tensor) -> torch.Tensor:
    """A [1, H, L, D] tensor as varlen's packed [L, H, D]."""
    return q[0].transpose(0, 1)


def _lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# Each a call with one bad argument, of q, k, v [1, 2, 8, 16] and doc [1, 8].
BAD_CALLS: dict[str, Callable[..., Any]] = {
    "q_dtype": lambda q, k, v, d: CHECKED(q.int(), k, v, doc=d),
    "k_dtype": lambda q, k, v, d: CHECKED(q.half(), k, v, doc=d),
    "missing_input": lambda q, k, v, d: CHECKED(q, k, v),
    "input_shape": lambda q, k, v, d: CHECKED(q, k, v, doc=d[:, :5]),
    "runtime_int_out_of_range": lambda q, k, v, d: CHECKED(q, k, v, doc=d, window=2**31),
    "float_tensor_parameter": lambda q, k, v, d: CHECKED(q, k, v, doc=d, temperature=torch.ones(2)),
    "return_lse_not_a_bool": lambda q, k, v, d: CHECKED(q, k, v, doc=d, return_lse=1),
    "decode_lengths_dtype": lambda q, k, v, d: CAUSAL.decode(
        q, k_cache=k, v_cache=v, cache_seqlens=d[0, :1].float()
    ),
    "varlen_max_seqlen_with_lse": lambda q, k, v, d: CAUSAL.varlen(
        *map(_packed, (q, k, v)),
        cu_seqlens_q=_lengths(0, 8),
        cu_seqlens_k=_lengths(0, 8),
        max_seqlen_q=-1,
        max_seqlen_k=8,
        return_lse=True,
    ),
    "chunk_outside_the_problem": lambda q, k, v, d: CAUSAL.chunk(
        q, k, v, q_offset=4, kv_offset=0, q_len=8, kv_len=8
    ),
}


def _raised(call: Callable[[], Any]) -> AttnError:
    with pytest.raises(AttnError) as info:
        call()
    return info.value


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph_breaks_allowed"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_a_compiled_call_raises_the_uncompiled_calls_error(case: str, fullgraph: bool) -> None:
    q, k, v = _qkv()
    d = _docs()
    eager = _raised(lambda: BAD_CALLS[case](q, k, v, d))
    compiled = torch.compile(BAD_CALLS[case], fullgraph=fullgraph, backend=compile_counter())
    raised = _raised(lambda: compiled(q, k, v, d))
    assert type(raised) is type(eager)
    assert str(raised) == str(eager)


def test_the_error_is_raised_also_when_the_calls_result_goes_unused() -> None:
    """The op has a side effect: no graph drops it as dead code."""
    q, k, v = _qkv()
    compiled = torch.compile(
        lambda q, k, v: (CHECKED(q, k, v), q + 1)[1], fullgraph=True, backend=compile_counter()
    )
    with pytest.raises(attnc.InputError, match="input 'doc' was not given"):
        compiled(q, k, v)


def test_tracing_goes_on_past_a_bad_call_and_a_later_good_call_compiles_again() -> None:
    """The placeholder results are shaped as the call's (the caller's reshape traces), and the graph
    that raises is guarded on what the check read (here q's dtype)."""
    counter = compile_counter()

    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        out, lse = CHECKED(q, k, v, doc=d, return_lse=True)
        return out.transpose(1, 2).reshape(1, 8, 32) * lse.transpose(1, 2).exp()[..., :1]

    compiled = torch.compile(block, fullgraph=True, backend=counter)
    q, k, v = _qkv()
    d = _docs()
    with pytest.raises(attnc.InputError, match="k must have q's dtype float16, got float32"):
        compiled(q.half(), k, v, d)
    torch.testing.assert_close(compiled(q, k, v, d), block(q, k, v, d))
    assert counter.frame_count == 2


class _MissingInput(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return CHECKED(q, k, v)


def test_torch_export_of_a_bad_call_raises_the_error_instead_of_exporting_it() -> None:
    """A program that always raises is no export: `torch.export` (non-strict: it runs the call)
    raises the call's error, as the uncompiled call does."""
    with pytest.raises(attnc.InputError, match="input 'doc' was not given"):
        torch.export.export(_MissingInput(), _qkv(), strict=False)


def test_a_strict_torch_export_of_a_bad_call_is_refused_with_the_reason() -> None:
    """Strict export traces with dynamo, whose refusal of the escaping error names it."""
    with pytest.raises(Exception, match="input 'doc' was not given"):
        torch.export.export(_MissingInput(), _qkv(), strict=True)


def test_a_runtime_int_out_of_range_is_the_uncompiled_error_also_once_dynamo_made_it_symbolic() -> None:
    """After two values dynamo traces a Python int as a `SymInt`; the message still shows the value
    given (before: dynamo's Unsupported "repr_impl not implemented", as it cannot repr a SymInt)."""
    q, k, v = _qkv()
    d = _docs()
    compiled = torch.compile(
        lambda q, k, v, w: CHECKED(q, k, v, doc=d, window=w), fullgraph=True, backend=compile_counter()
    )
    compiled(q, k, v, 4)
    compiled(q, k, v, 5)  # now `window` is dynamic
    eager = _raised(lambda: CHECKED(q, k, v, doc=d, window=2**31))
    raised = _raised(lambda: compiled(q, k, v, 2**31))
    assert type(raised) is type(eager)
    assert str(raised) == str(eager)
    torch.testing.assert_close(compiled(q, k, v, 6), CHECKED(q, k, v, doc=d, window=6))


def test_the_results_of_a_three_dimensional_q_are_shaped_as_sdpa_would_give_them() -> None:
    """A 3-D q [H, L, D] (as `scaled_dot_product_attention` takes it) is refused by a call that takes
    4-D tensors; the results that stand for it while tracing are out [H, L, Dv] and lse [H, L], so that
    the caller's code traces on (before: lse [L, H], varlen's packed order, and the caller's
    `out + lse[..., None]` failed while tracing with torch's broadcast error instead of attnc's)."""

    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, lse = CAUSAL(q, k, v, return_lse=True)
        return out + lse[..., None]

    q, k, v = (t[0] for t in _qkv())
    eager = _raised(lambda: block(q, k, v))
    raised = _raised(lambda: torch.compile(block, fullgraph=True, backend=compile_counter())(q, k, v))
    assert type(raised) is type(eager)
    assert str(raised) == str(eager)
