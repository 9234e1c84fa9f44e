"""`Kernel.decode`: new tokens against a KV cache, contiguous or paged, judged row by row by the oracle.

Row b's queries sit at positions `cache_seqlens[b] - Lq + i` and see its first `cache_seqlens[b]` keys:
the same as `kern.reference(q[b], k[b, :, :n], v[b, :, :n], q_offset=n - Lq)` with n = cache_seqlens[b].
"""

from __future__ import annotations

import pytest
import torch
from cases import compile_counter

import attnc
from attnc.runtime.launch import counting_visits

STD = attnc.stdlib()
STREAMING = attnc.load("examples/streaming_llm.attn").streaming_llm(window=24, sinks=4)
DOC = attnc.load("examples/document_causal.attn").document_causal()
SOFTCAP_SOURCE = attnc.loads("pattern p(cap: float) { mask = kv <= q\n score = cap * tanh(s / cap) }")
SOFTCAP = SOFTCAP_SOURCE.p(cap=4.0)


def cache(batch: int, heads: int, kv_heads: int, q_len: int, capacity: int, dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim)
    return q, torch.randn(batch, kv_heads, capacity, dim), torch.randn(batch, kv_heads, capacity, dim)


def paged(k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, page_size: int, seed: int = 1):
    """The rows of a contiguous cache [B, Hkv, L, D] in shuffled pages [pages, page_size, Hkv, D] (one
    spare), with the block table; unused table entries are -1 (never read)."""
    batch, kv_heads, capacity, dim = k.shape
    per_row = -(-capacity // page_size)
    order = torch.randperm(batch * per_row + 1, generator=torch.Generator().manual_seed(seed))
    k_pages = torch.full((len(order), page_size, kv_heads, dim), float("nan"))
    v_pages = k_pages.clone()
    table = torch.full((batch, per_row), -1, dtype=torch.int32)
    used = 0
    for b in range(batch):
        for i in range(-(-int(lens[b]) // page_size)):
            page, used = int(order[used]), used + 1
            table[b, i] = page
            rows = slice(i * page_size, min((i + 1) * page_size, capacity))
            k_pages[page, : rows.stop - rows.start] = k[b, :, rows].transpose(0, 1)
            v_pages[page, : rows.stop - rows.start] = v[b, :, rows].transpose(0, 1)
    return k_pages, v_pages, table


def per_row_reference(kern, q, k, v, lens, **inputs) -> torch.Tensor:
    q_len = q.shape[2]
    rows = []
    for b, n in enumerate(lens.tolist()):
        if n == 0:
            rows.append(torch.zeros_like(q[b : b + 1, :, :, : v.shape[3]]))
            continue
        row_inputs = {name: t[b : b + 1] for name, t in inputs.items()}
        ref = kern.reference(
            q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], q_offset=n - q_len, **row_inputs
        )
        rows.append(ref)
    return torch.cat(rows)


@pytest.mark.parametrize("q_len", [1, 3, 16])
@pytest.mark.parametrize("group", [1, 2, 8])
def test_decode_matches_the_oracle_row_by_row(q_len: int, group: int) -> None:
    lens = torch.tensor([70, 0, q_len, 41], dtype=torch.int32)
    q, k, v = cache(4, 8, 8 // group, q_len, 70)
    out, lse = STD.sliding_window(window=20).decode(q, k, v, cache_seqlens=lens, return_lse=True)
    want = per_row_reference(STD.sliding_window(window=20), q, k, v, lens)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("kern", [STD.causal(), SOFTCAP, STREAMING], ids=lambda k: k.name)
def test_a_paged_cache_with_shuffled_pages_gives_the_contiguous_result(kern, page_size: int) -> None:
    lens = torch.tensor([130, 0, 17, 64], dtype=torch.int32)
    q, k, v = cache(4, 4, 2, 3 if page_size == 16 else 1, 130)
    contiguous = kern.decode(q, k, v, cache_seqlens=lens)
    k_pages, v_pages, table = paged(k, v, lens, page_size)
    out = kern.decode(q, k_pages, v_pages, cache_seqlens=lens, block_table=table)
    torch.testing.assert_close(out, contiguous, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, per_row_reference(kern, q, k, v, lens), atol=2e-6, rtol=2e-6)


def test_a_metadata_pattern_decodes_with_per_row_lengths() -> None:
    lens = torch.tensor([60, 33], dtype=torch.int32)
    q, k, v = cache(2, 2, 2, 4, 60)
    doc = torch.tensor([[0] * 25 + [1] * 35, [0] * 10 + [1] * 50], dtype=torch.int32)
    out = DOC.decode(q, k, v, cache_seqlens=lens, doc=doc)
    # The oracle row by row: each row's doc ids cut to its keys.
    want = torch.cat(
        [
            DOC.reference(
                q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], q_offset=n - 4, doc=doc[b : b + 1, :n]
            )
            for b, n in enumerate(lens.tolist())
        ]
    )
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)


def test_streaming_decode_reads_only_the_sink_and_window_pages() -> None:
    # 4 sinks and a window of 24 at position 199 (keys 0-3 and 176-199): pages (16 rows) 0, 11 and 12 of 13.
    lens = torch.tensor([200], dtype=torch.int32)
    q, k, v = cache(1, 2, 1, 1, 208)
    k_pages, v_pages, table = paged(k, v, lens, 16)
    with counting_visits() as visits:
        out = STREAMING.decode(
            q, k_pages, v_pages, cache_seqlens=lens, block_table=table, kernel_options={"BLOCK_N": 16}
        )
    visited = (visits["forward"][0, :, 0] > 0).nonzero()[:, 1].unique().tolist()
    assert visited == [0, 11, 12]
    # The plan of the same call says so before any launch.
    plan = STREAMING.plan(1, 208, block=(16, 16), q_offset=199)
    assert (plan.block_map()[0, 0, 0] > 0).nonzero()[:, 0].tolist() == [0, 11, 12]
    torch.testing.assert_close(out, per_row_reference(STREAMING, q, k, v, lens), atol=2e-6, rtol=2e-6)


def test_chunked_prefill_against_the_cache_equals_the_full_sequence() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 240, 16) for _ in range(3))
    full = STD.causal()(q, k, v)
    chunk = STD.causal().decode(q[:, :, 200:], k, v, cache_seqlens=torch.tensor([240], dtype=torch.int32))
    torch.testing.assert_close(chunk, full[:, :, 200:], atol=1e-6, rtol=1e-6)


def test_decode_has_no_backward() -> None:
    q, k, v = cache(1, 2, 2, 1, 20)
    q.requires_grad_(True)
    out = STD.causal().decode(q, k, v, cache_seqlens=torch.tensor([20], dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="have no backward pass yet"):
        out.sum().backward()


@pytest.mark.parametrize(
    ("lens", "match"),
    [
        ([21, 5], r"cache_seqlens\[0\] = 21: each row holds 0 keys or from Lq=2 to the cache's capacity 20"),
        ([1, 5], r"cache_seqlens\[0\] = 1"),
        ([-1, 5], r"cache_seqlens\[0\] = -1"),
    ],
    ids=["past_capacity", "fewer_than_lq", "negative"],
)
def test_bad_cache_lengths_are_clear_errors(lens: list[int], match: str) -> None:
    q, k, v = cache(2, 2, 2, 2, 20)
    with pytest.raises(attnc.InputError, match=match):
        STD.causal().decode(q, k, v, cache_seqlens=torch.tensor(lens, dtype=torch.int32))


def test_a_block_table_entry_outside_the_cache_is_a_clear_error() -> None:
    lens = torch.tensor([40], dtype=torch.int32)
    q, k, v = cache(1, 2, 2, 1, 48)
    k_pages, v_pages, table = paged(k, v, lens, 16)
    table[0, 2] = k_pages.shape[0]
    with pytest.raises(
        attnc.InputError, match=r"block_table\[0, 2\] = 4 is not a page of the cache \(it has 4\)"
    ):
        STD.causal().decode(q, k_pages, v_pages, cache_seqlens=lens, block_table=table)
    table[0, 2] = -1  # past the row's length: never read, so allowed
    table[0, 1], lens[0] = -3, 20
    with pytest.raises(attnc.InputError, match=r"block_table\[0, 1\] = -3"):
        STD.causal().decode(q, k_pages, v_pages, cache_seqlens=lens, block_table=table)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"cache_seqlens": torch.tensor([5.0])},
            attnc.InputTypeError,
            "cache_seqlens must be a int32 or int64 tensor",
        ),
        ({"cache_seqlens": torch.tensor([5, 5], dtype=torch.int32)}, attnc.InputError, r"shape \[1\]"),
        (
            {"block_table": torch.zeros(1, 2, dtype=torch.int64)},
            attnc.InputTypeError,
            "block_table must be a int32",
        ),
        ({"page_size": 24}, attnc.InputError, "page_size .* must be a power of two >= 16"),
    ],
    ids=["float_lengths", "lengths_shape", "table_dtype", "page_size"],
)
def test_bad_decode_arguments_are_clear_errors(change: dict, error: type, match: str) -> None:
    q = torch.randn(1, 2, 1, 16)
    page_size = change.pop("page_size", 16)
    k_pages = torch.zeros(4, page_size, 2, 16)
    kwargs = {
        "cache_seqlens": torch.tensor([5], dtype=torch.int32),
        "block_table": torch.zeros(1, 2, dtype=torch.int32),
    }
    kwargs.update(change)
    with pytest.raises(error, match=match):
        STD.causal().decode(q, k_pages, k_pages, **kwargs)


@pytest.mark.parametrize("q_len", [1, 16])
@pytest.mark.parametrize("kern", [STD.causal(), STREAMING], ids=lambda k: k.name)
def test_split_keys_merged_by_lse_agree_with_one_pass(kern, q_len: int) -> None:
    lens = torch.tensor([130, 0, 77], dtype=torch.int32)
    q, k, v = cache(3, 4, 2, q_len, 130)
    k_pages, v_pages, table = paged(k, v, lens, 16)
    options = {"BLOCK_N": 16}
    with counting_visits() as one_pass:
        out, lse = kern.decode(
            q,
            k_pages,
            v_pages,
            cache_seqlens=lens,
            block_table=table,
            return_lse=True,
            kernel_options=options,
        )
    with counting_visits() as split:
        out_split, lse_split = kern.decode(
            q, k_pages, v_pages, cache_seqlens=lens, block_table=table, return_lse=True,
            kernel_options={**options, "SPLIT_KV": 3},
        )  # fmt: skip
    # Every tile is visited as often, and as masked or not, as without the split: once, by one split.
    assert torch.equal(split["forward"], one_pass["forward"])
    torch.testing.assert_close(out_split, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_split, lse, atol=1e-6, rtol=1e-6)
    assert torch.isneginf(lse_split[1]).all() and (out_split[1] == 0).all()


def test_split_keys_in_a_training_forward_keep_its_gradients() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (8, 90, 90))
    kern = STD.causal()
    out = kern(q, k, v, q_offset=82, kernel_options={"SPLIT_KV": 4})
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = kern.reference(q64, k64, v64, q_offset=82)
    want = torch.autograd.grad(ref.sum(), (q64, k64, v64))
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def test_a_bad_split_count_is_a_clear_error() -> None:
    q, k, v = cache(1, 2, 2, 1, 20)
    with pytest.raises(attnc.InputError, match="SPLIT_KV must be from 1 to 1024, got 0"):
        STD.causal().decode(
            q, k, v, cache_seqlens=torch.tensor([20], dtype=torch.int32), kernel_options={"SPLIT_KV": 0}
        )


ALIBI = attnc.loads(
    "pattern alibi { input slopes: float32[NUM_HEADS]\n mask = kv <= q\n score = s - slopes[h] * (q - kv) }"
).alibi()


@pytest.mark.parametrize("kern", [STD.causal(), STREAMING], ids=lambda k: k.name)
def test_packed_query_heads_read_each_key_tile_once_per_group_and_agree(kern) -> None:
    lens = torch.tensor([130, 0, 41], dtype=torch.int32)
    q, k, v = cache(3, 8, 2, 3, 130)
    k_pages, v_pages, table = paged(k, v, lens, 16)
    call = dict(cache_seqlens=lens, block_table=table, return_lse=True)
    with counting_visits() as per_head:
        out, lse = kern.decode(q, k_pages, v_pages, **call, kernel_options={"BLOCK_M": 16, "PACK_GQA": False})
    with counting_visits() as packed:
        got, got_lse = kern.decode(
            q, k_pages, v_pages, **call, kernel_options={"BLOCK_M": 16, "PACK_GQA": True}
        )
    # 4 query heads x 3 new tokens fill one 16-row tile per key/value head: the tiles are visited by
    # one program per (row, key/value head) instead of one per query head.
    assert per_head["forward"].shape[1] == 8 and packed["forward"].shape[1] == 2
    assert torch.equal(packed["forward"][:, :, 0] > 0, per_head["forward"][:, ::4, 0] > 0)
    torch.testing.assert_close(got, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_lse, lse, atol=1e-6, rtol=1e-6)


def test_a_pattern_that_reads_the_head_is_never_packed() -> None:
    q, k, v = cache(1, 4, 2, 2, 30)
    slopes = torch.tensor([0.1, 0.2, 0.3, 0.4])
    with counting_visits() as visits:
        out = ALIBI.decode(
            q,
            k,
            v,
            cache_seqlens=torch.tensor([30], dtype=torch.int32),
            slopes=slopes,
            kernel_options={"PACK_GQA": True},
        )
    assert visits["forward"].shape[1] == 4
    want = ALIBI.reference(q, k, v, q_offset=28, slopes=slopes)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)


# ---- torch.compile: the values of cache_seqlens and the block table are checked in the op ----------------


def compiled_decode(kern, **fixed):
    """`kern.decode` under `torch.compile(fullgraph=True)`: one graph, no break around the call."""
    return torch.compile(
        lambda q, k, v, lens, table: kern.decode(q, k, v, cache_seqlens=lens, block_table=table, **fixed),
        fullgraph=True,
        backend=compile_counter(),
    )


@pytest.mark.parametrize("paged_cache", [False, True], ids=["contiguous", "paged"])
def test_a_fullgraph_compiled_decode_with_a_float_parameter_matches_the_oracle(paged_cache: bool) -> None:
    lens = torch.tensor([70, 0, 3, 41], dtype=torch.int32)
    q, k, v = cache(4, 4, 2, 3, 70)
    want = per_row_reference(SOFTCAP_SOURCE.p(cap=2.0), q, k, v, lens)
    k_cache, v_cache, table = paged(k, v, lens, 16) if paged_cache else (k, v, None)
    out = compiled_decode(SOFTCAP, cap=2.0)(q, k_cache, v_cache, lens, table)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize(
    ("lens", "match"),
    [
        ([21, 5], r"cache_seqlens\[0\] = 21: each row holds 0 keys or from Lq=2 to the cache's capacity 20"),
        ([5, 1], r"cache_seqlens\[1\] = 1"),
        ([2**32 + 5, 5], r"cache_seqlens\[0\] = 4294967301"),  # int64: not wrapped to 5 before the check
        # Not reported as the query offsets decode derives from them (before: "q_offset must be >= 0 with
        # q_offset + q_len <= 1073741824 (2**30) in every batch row", uncompiled only).
        ([2**31, 5], r"cache_seqlens\[0\] = 2147483648"),
        ([2**30 + 100, 5], r"cache_seqlens\[0\] = 1073741924"),
    ],
    ids=["past_capacity", "fewer_than_lq", "past_int32", "int32_sign_bit", "past_the_size_limit"],
)
def test_bad_cache_lengths_are_the_same_errors_compiled(lens: list[int], match: str) -> None:
    q, k, v = cache(2, 2, 2, 2, 20)
    lengths = torch.tensor(lens, dtype=torch.int64)
    with pytest.raises(attnc.InputError, match=match) as eager:
        STD.causal().decode(q, k, v, cache_seqlens=lengths)
    with pytest.raises(attnc.InputError, match=match) as compiled:
        compiled_decode(STD.causal())(q, k, v, lengths, None)
    assert str(compiled.value) == str(eager.value)


def test_unchecked_lengths_past_the_capacity_are_cut_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU caller's broken contract (lengths the op does not read, without ATTNC_DEBUG): a row that
    claims more keys than the cache holds is the full row, its queries at the cache's last positions
    (before: the keys were cut, the queries' positions were not)."""
    from attnc.runtime import autograd

    monkeypatch.setattr(autograd, "_readable", lambda t: False)
    q, k, v = cache(2, 2, 2, 3, 20)
    out = STREAMING.decode(q, k, v, cache_seqlens=torch.tensor([20 + 7, 9], dtype=torch.int32))
    want = STREAMING.decode(q, k, v, cache_seqlens=torch.tensor([20, 9], dtype=torch.int32))
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_a_compiled_decode_refuses_a_block_table_entry_outside_the_cache() -> None:
    lens = torch.tensor([40], dtype=torch.int32)
    q, k, v = cache(1, 2, 2, 1, 48)
    k_pages, v_pages, table = paged(k, v, lens, 16)
    table[0, 1] = -3
    with pytest.raises(attnc.InputError, match=r"block_table\[0, 1\] = -3 is not a page of the cache"):
        compiled_decode(STD.causal())(q, k_pages, v_pages, lens, table)


def test_a_value_error_points_at_the_calling_pattern_not_one_that_shares_its_kernels() -> None:
    """A pattern of stdlib causal's structure shares its op pattern (and kernels); the op checks the
    lengths, and its error still points at this pattern's line."""
    mine = attnc.loads("\n\npattern mine { mask = kv <= q }", "mine.attn").mine()
    assert mine._forward is STD.causal()._forward
    q, k, v = cache(1, 2, 2, 1, 20)
    with pytest.raises(attnc.InputError) as raised:
        mine.decode(q, k, v, cache_seqlens=torch.tensor([21], dtype=torch.int32))
    assert str(raised.value).startswith("mine.attn:3:9: error: cache_seqlens[0] = 21")
    assert str(raised.value).endswith("  pattern mine { mask = kv <= q }\n          ^~~~")
