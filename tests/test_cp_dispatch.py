"""Context parallel dispatch (issue 22, host side): the tile census against the exact block map, the
balance of the assignment, the chunks each rank receives, shard / unshard, and the errors. The dispatch
needs no process group (`world_size=`); one 2-process gloo run (`gloo_results`) serves the tests of
`unshard` and of inputs that differ across ranks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnc
from attnc.distributed import ContextParallel, CostModel, Layout, context_parallel, tile_census
from attnc.distributed.census import BlockRangeTable
from attnc.distributed.fingerprint import mask_key

ROOT = Path(__file__).resolve().parents[1]
BLOCK = (32, 32)
SEQ, CHUNK = 1024, 128  # 8 chunks of 4 x 4 tiles


def documents(lengths: list[int]) -> torch.Tensor:
    counts = torch.tensor(lengths)
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), counts).reshape(1, -1)


def cases() -> dict[str, tuple[attnc.Kernel, dict[str, Any]]]:
    std = attnc.stdlib()
    document = attnc.load(ROOT / "examples" / "document_causal.attn").document_causal()
    return {
        "causal": (std.causal(), {}),
        "sliding": (std.sliding_window(window=100), {}),
        "document": (document, {"doc": documents([100, 300, 50, 30, 200, 344])}),
    }


CASES = cases()


def chunk_counts(kern: attnc.Kernel, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """PARTIAL and FULL tiles per (query chunk, key chunk) from the exact block map: the judge."""
    classes = kern.block_map(SEQ, SEQ, block=BLOCK, batch=1, num_heads=1, **inputs)[0, 0]
    n, t = SEQ // CHUNK, CHUNK // BLOCK[0]
    per_chunk = lambda value: (classes == value).reshape(n, t, n, t).sum((1, 3))  # noqa: E731
    return per_chunk(1), per_chunk(2)


def dispatch(name: str, world_size: int = 4, **options: Any) -> Layout:
    kern, inputs = CASES[name]
    cp = ContextParallel(kern, world_size=world_size, block=BLOCK, **options)
    return cp.dispatch(SEQ, chunk=CHUNK, **inputs)


def imbalance(costs: list[float]) -> float:
    return max(costs) / (sum(costs) / len(costs))


def longformer(**options: Any) -> Layout:
    """Longformer-style (16 global tokens, a window of 20) over 8 chunks on 4 ranks: the chunk holding
    the global tokens alone costs about half a rank's share, so no layout of whole chunks balances."""
    kern = attnc.load(ROOT / "examples" / "longformer.attn").longformer_global(w=20)
    is_global = torch.zeros((1, SEQ), dtype=torch.bool)
    is_global[0, :16] = True
    cp = ContextParallel(kern, world_size=4, block=BLOCK, **options)
    return cp.dispatch(SEQ, chunk=CHUNK, is_global=is_global)


def test_a_heavy_query_chunk_is_split_by_its_keys_to_balance() -> None:
    whole, split = longformer(split_target=float("inf")), longformer()
    assert not whole.parts and split.parts
    for key in ("forward_cost", "backward_cost"):
        assert imbalance([s[key] for s in whole.stats()]) > 1.4
        assert imbalance([s[key] for s in split.stats()]) <= 1.05


def test_split_costs_sum_to_the_unsplit_total_and_parts_cost_their_tiles() -> None:
    whole, split = longformer(split_target=float("inf")), longformer()
    for key in ("forward_cost", "backward_cost"):
        assert sum(s[key] for s in split.stats()) == pytest.approx(sum(s[key] for s in whole.stats()))
    kern = attnc.load(ROOT / "examples" / "longformer.attn").longformer_global(w=20)
    is_global = torch.zeros((1, SEQ), dtype=torch.bool)
    is_global[0, :16] = True
    partial, full = chunk_counts(kern, {"is_global": is_global})
    model = CostModel()
    for part in split.parts:
        keys = list(part.kv_chunks)
        forward = model.forward_partial * partial + model.forward_full * full
        backward = model.backward_partial * partial + model.backward_full * full
        assert part.forward == pytest.approx(float(forward[part.q_chunk, keys].sum()))
        assert part.backward == pytest.approx(float(backward[part.q_chunk, keys].sum()))


def test_a_split_chunks_owner_and_parts_cover_its_visited_keys_once() -> None:
    layout = longformer()
    for c in range(layout.num_chunks):
        pieces = [layout.own_kv_chunks(c), *(p.kv_chunks for p in layout.parts_of(c))]
        assert sorted(j for piece in pieces for j in piece) == list(layout.kv_chunks(c))
        assert all(p.helper != layout.owner[c] for p in layout.parts_of(c))


def test_a_rank_receives_exactly_the_chunks_its_queries_and_parts_visit() -> None:
    layout = longformer()
    for rank in range(4):
        mine = set(layout.chunks(rank))
        needed = {j for c in mine for j in layout.own_kv_chunks(c)}
        needed |= {j for p in layout.helps(rank) for j in p.kv_chunks}
        received = layout.receives(rank)
        assert {c for chunks in received.values() for c in chunks} == needed - mine
        queries = layout.q_receives(rank)
        assert sorted(c for chunks in queries.values() for c in chunks) == [
            p.q_chunk for p in layout.helps(rank)
        ]
        assert all(layout.owner[c] == src for src, chunks in queries.items() for c in chunks)
        for dst, chunks in layout.q_sends(rank).items():
            assert layout.q_receives(dst)[rank] == chunks


def test_bytes_received_count_query_chunks_and_partial_outputs() -> None:
    layout = longformer()
    stats = layout.stats(head_dim=16, dtype=torch.float32)
    for s in stats:
        kv = s["chunks_received"] * 2 * CHUNK * 16 * 4
        q = s["query_chunks_received"] * CHUNK * 16 * 4
        partials = s["partials_received"] * CHUNK * 17 * 4  # output and lse rows, float32
        assert s["bytes_received"] == kv + q + partials
    assert sum(s["query_chunks_received"] for s in stats) == len(layout.parts)
    assert sum(s["partials_received"] for s in stats) == len(layout.parts)


@pytest.mark.parametrize("name", sorted(CASES))
def test_layouts_that_balance_whole_are_not_split(name: str) -> None:
    layout, whole = dispatch(name), dispatch(name, split_target=float("inf"))
    assert layout.parts == () and layout.owner == whole.owner


def test_a_split_target_below_one_is_an_error() -> None:
    with pytest.raises(attnc.InputError, match="split_target must be a number >= 1"):
        ContextParallel(attnc.stdlib().causal(), world_size=2, split_target=0.5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_census_counts_the_block_maps_tiles(name: str) -> None:
    kern, inputs = CASES[name]
    census = tile_census(kern, SEQ, chunk=CHUNK, block=BLOCK, batch=1, num_heads=1, **inputs)
    partial, full = chunk_counts(kern, inputs)
    assert torch.equal(census.partial, partial)
    assert torch.equal(census.full, full)


def test_census_counts_every_batch_row_and_head() -> None:
    kern, _ = CASES["causal"]
    one = tile_census(kern, SEQ, chunk=CHUNK, block=BLOCK, batch=1, num_heads=1)
    many = tile_census(kern, SEQ, chunk=CHUNK, block=BLOCK, batch=2, num_heads=3)
    assert torch.equal(many.partial, one.partial * 6)
    assert torch.equal(many.full, one.full * 6)


def test_census_sums_the_tiles_of_each_head_and_batch_row() -> None:
    kern = attnc.loads(
        "pattern per_head {\n"
        "    input doc: int32[BATCH, KV_LEN]\n"
        "    mask = doc[b, q] == doc[b, kv] and q - kv < 64 * (h + 1) and kv <= q\n"
        "}\n"
    ).per_head()
    doc = torch.cat([documents([500, 524]), documents([100, 900, 24])])
    census = tile_census(kern, SEQ, chunk=CHUNK, block=BLOCK, batch=2, num_heads=3, doc=doc)
    classes = kern.block_map(SEQ, SEQ, block=BLOCK, batch=2, num_heads=3, doc=doc)
    n, t = SEQ // CHUNK, CHUNK // BLOCK[0]
    per_chunk = lambda value: (classes == value).reshape(6, n, t, n, t).sum((0, 2, 4))  # noqa: E731
    assert torch.equal(census.partial, per_chunk(1))
    assert torch.equal(census.full, per_chunk(2))


@pytest.mark.parametrize("name", sorted(CASES))
def test_rank_costs_follow_the_cost_model(name: str) -> None:
    kern, inputs = CASES[name]
    model = CostModel(forward_full=1.0, forward_partial=2.0, backward_full=3.0, backward_partial=5.0)
    layout = dispatch(name, cost_model=model)
    partial, full = (x.sum(1) for x in chunk_counts(kern, inputs))
    for stats in layout.stats():
        mine = list(layout.chunks(stats["rank"]))
        assert stats["forward_cost"] == pytest.approx(float((2.0 * partial + full)[mine].sum()))
        assert stats["backward_cost"] == pytest.approx(float((5.0 * partial + 3.0 * full)[mine].sum()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_dispatch_balances_forward_and_backward(name: str) -> None:
    # 4096 tokens, 4 ranks of 8 chunks: with 2 chunks each, whole chunks cannot balance these masks
    # (the first sliding-window chunk is cheaper than all others, a document's last chunk costlier).
    kern, inputs = CASES[name]
    if "doc" in inputs:
        inputs = {"doc": documents([700, 1500, 300, 96, 1000, 500])}
    cp = ContextParallel(kern, world_size=4, block=BLOCK)
    stats = cp.dispatch(4096, chunk=CHUNK, **inputs).stats()
    assert imbalance([s["forward_cost"] for s in stats]) <= 1.05
    assert imbalance([s["backward_cost"] for s in stats]) <= 1.05


def test_batch_defaults_to_the_inputs_batch_rows() -> None:
    kern, _ = CASES["document"]
    doc = torch.cat([documents([500, 524]), documents([100, 900, 24])])
    cp = ContextParallel(kern, world_size=2, block=BLOCK)
    inferred, given = cp.dispatch(SEQ, chunk=CHUNK, doc=doc), cp.dispatch(SEQ, batch=2, chunk=CHUNK, doc=doc)
    assert inferred.batch == 2
    assert inferred.forward == given.forward


def test_every_rank_holds_as_many_chunks() -> None:
    layout = dispatch("document", world_size=3)  # 8 chunks: 3, 3, 2
    assert [len(layout.chunks(r)) for r in range(3)] == [3, 3, 2]


def test_dispatch_is_deterministic() -> None:
    first = dispatch("document", rank=0)
    again = ContextParallel(
        attnc.load(ROOT / "examples" / "document_causal.attn").document_causal(),
        world_size=4,
        rank=2,
        block=BLOCK,
    ).dispatch(SEQ, chunk=CHUNK, doc=documents([100, 300, 50, 30, 200, 344]))
    assert again.owner == first.owner
    assert again.receives(1) == first.receives(1)


def test_equal_costs_keep_contiguous_runs() -> None:
    # Every sliding-window chunk but the first costs the same: contiguous runs balance as well as any
    # split and receive one neighbouring chunk each.
    layout = dispatch("sliding")
    assert layout.owner == (0, 0, 1, 1, 2, 2, 3, 3)
    assert [layout.receives(r) for r in range(4)] == [{}, {0: (1,)}, {1: (3,)}, {2: (5,)}]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_rank_receives_exactly_the_chunks_its_queries_visit(name: str) -> None:
    kern, inputs = CASES[name]
    partial, full = chunk_counts(kern, inputs)
    visited = (partial + full) > 0
    layout = dispatch(name)
    for rank in range(4):
        mine = set(layout.chunks(rank))
        needed = {j for i in mine for j in visited[i].nonzero().flatten().tolist()} - mine
        received = layout.receives(rank)
        assert {c for chunks in received.values() for c in chunks} == needed
        assert all(layout.owner[c] == src for src, chunks in received.items() for c in chunks)


def test_sends_mirror_receives() -> None:
    layout = dispatch("document")
    for rank in range(4):
        for dst, chunks in layout.sends(rank).items():
            assert layout.receives(dst)[rank] == chunks


def test_kv_chunks_are_the_visited_key_chunks() -> None:
    kern, inputs = CASES["sliding"]
    partial, full = chunk_counts(kern, inputs)
    layout = dispatch("sliding")
    for q_chunk in range(layout.num_chunks):
        assert layout.kv_chunks(q_chunk) == tuple(
            ((partial + full)[q_chunk] > 0).nonzero().flatten().tolist()
        )


def test_bytes_received_count_k_and_v_rows() -> None:
    layout = dispatch("sliding")
    stats = layout.stats(head_dim=16, dtype=torch.float32, kv_heads=2)
    # Rank 1 receives chunk 1: K and V, 128 rows, 2 heads of 16 float32.
    assert stats[1]["chunks_received"] == 1
    assert stats[1]["bytes_received"] == 2 * CHUNK * 2 * 16 * 4


def test_dispatch_many_balances_the_sum_of_the_kernels() -> None:
    std = attnc.stdlib()
    cp = ContextParallel(std.causal(), world_size=4, block=BLOCK)
    sliding, causal = std.sliding_window(window=100), std.causal()
    layout = cp.dispatch_many(SEQ, [(sliding, {}, 3), (causal, {})], chunk=CHUNK)
    alone = [cp.dispatch_many(SEQ, [(k, {})], chunk=CHUNK) for k in (sliding, causal)]
    expected = [3 * a + b for a, b in zip(alone[0].forward, alone[1].forward, strict=True)]
    assert layout.forward == pytest.approx(expected)
    assert imbalance([s["forward_cost"] for s in layout.stats()]) <= 1.05
    assert imbalance([s["backward_cost"] for s in layout.stats()]) <= 1.05


@pytest.mark.parametrize("name", sorted(CASES))
def test_half_counts_are_the_census_of_chunks_half_as_large(name: str) -> None:
    kern, inputs = CASES[name]
    census = tile_census(kern, SEQ, chunk=CHUNK, block=BLOCK, batch=1, num_heads=1, **inputs)
    halves = tile_census(kern, SEQ, chunk=CHUNK // 2, block=BLOCK, batch=1, num_heads=1, **inputs)
    assert torch.equal(census.half_partial, halves.partial.sum(1).reshape(-1, 2))
    assert torch.equal(census.half_full, halves.full.sum(1).reshape(-1, 2))


def test_block_range_tables_are_exact_on_block_boxes_and_wider_off_them() -> None:
    values = torch.tensor([[5, 3, 9, 1, 4, 4, 7, 2, 8, 6]], dtype=torch.int32)  # blocks of 4: 3 of them
    table = BlockRangeTable.build(values, 1, 4)
    row = torch.zeros((), dtype=torch.int64)
    for lo, hi in [
        (0, 3),
        (4, 7),
        (0, 7),
        (8, 9),
        (4, 9),
        (1, 6),
        (5, 5),
        (-2, 3),
        (8, 12),
        (11, 14),
        (3, 2),
    ]:
        low, high = table.query([row, None], torch.tensor(lo), torch.tensor(hi))
        inside = values[0, max(lo, 0) : hi + 1].tolist() + ([0] if lo < 0 or hi > 9 or lo > hi else [])
        if lo > 9 or lo > hi:
            inside = [0]
        whole_blocks = lo % 4 == 0 and (hi % 4 == 3 or hi == 9)
        if whole_blocks or lo > hi or lo > 9:  # exact
            assert (int(low), int(high)) == (min(inside), max(inside)), (lo, hi)
        else:  # another box: the bounds of the blocks it touches, which hold its values
            assert int(low) <= min(inside) and int(high) >= max(inside), (lo, hi)
    assert [int(x) for x in table.query([row, None], torch.tensor(1), torch.tensor(6))] == [1, 9]


def test_smaller_chunks_are_not_tried_where_the_heaviest_half_chunk_bounds_the_balance(monkeypatch) -> None:
    # One global token row visits every key: its chunk, halved or not, outweighs a rank's share.
    kern = attnc.load(ROOT / "examples" / "longformer.attn").longformer_global(w=8)
    is_global = torch.zeros((1, SEQ), dtype=torch.bool)
    is_global[0, :8] = True
    sizes: list[int] = []
    census_from_env = context_parallel.census_from_env

    def counting(kern: attnc.Kernel, env: Any, seq_len: int, chunk: int, *rest: Any) -> Any:
        sizes.append(chunk)
        return census_from_env(kern, env, seq_len, chunk, *rest)

    monkeypatch.setattr(context_parallel, "census_from_env", counting)
    # Whole chunks only: a split (the default) balances this layout by the global row's keys.
    cp = ContextParallel(kern, world_size=4, block=BLOCK, split_target=float("inf"))
    layout = cp.dispatch(SEQ, is_global=is_global)
    assert imbalance([s["backward_cost"] for s in layout.stats()]) > 1.4  # above BALANCE_TARGET
    assert sizes == [64]  # the default chunk; not 32


def test_default_chunk_gives_every_rank_four_chunks() -> None:
    cp = ContextParallel(attnc.stdlib().causal(), world_size=4)
    assert cp.dispatch(4 * 2048).chunk == 512
    assert cp.dispatch(4 * 8192).chunk == 1024


def test_shard_then_assemble_is_the_identity() -> None:
    layout = dispatch("document", world_size=3)
    x = torch.randn(2, 3, SEQ, 4)
    shards = [x.index_select(-2, layout.token_index(r)) for r in range(3)]
    assert torch.equal(layout.shard(x), shards[0])
    assert torch.equal(layout.assemble(shards), x)


def test_ranks_beyond_the_chunks_hold_nothing() -> None:
    layout = dispatch("document", world_size=12)  # 8 chunks
    assert sorted(len(layout.chunks(r)) for r in range(12)) == [0] * 4 + [1] * 8
    x = torch.randn(1, 1, SEQ, 2)
    shards = [x.index_select(-2, layout.token_index(r)) for r in range(12)]  # 4 of them empty
    assert torch.equal(layout.assemble(shards), x)
    assert all(s["forward_cost"] == 0 for s in layout.stats() if s["chunks_held"] == 0)


def test_shard_holds_the_ranks_chunks_in_order() -> None:
    layout = dispatch("causal", rank=1)
    x = torch.arange(SEQ).reshape(1, 1, SEQ, 1)
    expected = torch.cat([torch.arange(c * CHUNK, (c + 1) * CHUNK) for c in layout.chunks(1)])
    assert torch.equal(layout.shard(x).flatten(), expected)


MASK_AND_SCORE = """
pattern doc_bias {
    input doc: int32[BATCH, KV_LEN]
    input slope: float32[NUM_HEADS]
    mask = kv <= q and doc[b, q] == doc[b, kv]
    score = s - slope[h] * (q - kv)
}
"""


def test_a_layout_records_the_inputs_its_mask_reads_not_those_of_the_score() -> None:
    # cp(...) refuses a call whose mask differs from the dispatched one; a learnable score input may
    # change between the dispatch and the calls (one layout for every training step).
    kern = attnc.loads(MASK_AND_SCORE).doc_bias()
    doc, slope = documents([300, 724]), torch.tensor([0.5])
    layout = ContextParallel(kern, world_size=2, block=BLOCK).dispatch(SEQ, chunk=CHUNK, doc=doc, slope=slope)
    assert mask_key(kern.pattern, {"doc": doc.clone(), "slope": slope + 1}, {}) in layout.masks
    assert mask_key(kern.pattern, {"doc": documents([301, 723]), "slope": slope}, {}) not in layout.masks
    assert mask_key(attnc.stdlib().causal().pattern, {}, {}) not in layout.masks


def test_shard_of_another_length_is_an_error() -> None:
    with pytest.raises(attnc.InputError, match="1024 tokens"):
        dispatch("causal").shard(torch.zeros(1, 1, 1000, 4))


def test_assemble_of_a_wrong_shard_is_an_error() -> None:
    layout = dispatch("causal")
    shards = [torch.zeros(1, 1, len(layout.chunks(r)) * CHUNK, 4) for r in range(4)]
    shards[2] = shards[2][..., :-1, :]
    with pytest.raises(attnc.InputError, match="rank 2's shard must hold 256 tokens"):
        layout.assemble(shards)


def test_assemble_of_too_few_shards_is_an_error() -> None:
    with pytest.raises(attnc.InputError, match="takes 4 shards"):
        dispatch("causal").assemble([torch.zeros(1, 1, 256, 4)])


def test_unshard_without_a_process_group_is_an_error() -> None:
    with pytest.raises(attnc.InputError, match=r"layout\.assemble"):
        dispatch("causal").unshard(torch.zeros(1, 1, 256, 4))


def test_seq_len_not_a_multiple_of_the_chunk_is_an_error() -> None:
    cp = ContextParallel(attnc.stdlib().causal(), world_size=2, block=BLOCK)
    with pytest.raises(attnc.InputError, match="not a multiple of chunk=128"):
        cp.dispatch(1000, chunk=128)


def test_chunk_not_a_multiple_of_the_tile_is_an_error() -> None:
    cp = ContextParallel(attnc.stdlib().causal(), world_size=2, block=BLOCK)
    with pytest.raises(attnc.InputError, match="multiple of the tile sizes"):
        cp.dispatch(1024, chunk=48)


def test_a_malformed_dispatch_many_entry_is_an_error() -> None:
    kern = attnc.stdlib().causal()
    cp = ContextParallel(kern, world_size=2, block=BLOCK)
    with pytest.raises(attnc.InputError, match="entry is"):
        cp.dispatch_many(SEQ, [(kern, {}, 0)], chunk=CHUNK)


def test_world_size_is_needed_without_a_process_group() -> None:
    with pytest.raises(attnc.InputError, match="pass world_size="):
        ContextParallel(attnc.stdlib().causal())


def _port_file() -> str:
    handle, path = tempfile.mkstemp(prefix="attnc-cp-")
    os.close(handle)
    os.unlink(path)  # FileStore creates it
    return path


def test_world_size_other_than_the_groups_is_an_error() -> None:
    dist.init_process_group("gloo", init_method=f"file://{_port_file()}", rank=0, world_size=1)
    try:
        with pytest.raises(attnc.InputError, match="the process group has 1 ranks"):
            ContextParallel(attnc.stdlib().causal(), world_size=2)
    finally:
        dist.destroy_process_group()


def _gloo_worker(rank: int, store: str, out: str) -> None:
    """Rank `rank` of a 2-process gloo group: unshards its shard of a known tensor, then dispatches
    with inputs that differ on rank 1; saves both outcomes for the tests below."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        kern, inputs = cases()["document"]
        layout = ContextParallel(kern, block=BLOCK).dispatch(SEQ, chunk=CHUNK, **inputs)
        x = torch.randn(1, 2, SEQ, 4, generator=torch.Generator().manual_seed(0))
        result: dict[str, Any] = {"full": x, "unsharded": layout.unshard(layout.shard(x) + 0)}
        doc = inputs["doc"].clone()
        doc[0, -1] += rank  # rank 1's last token in a document of its own
        try:
            ContextParallel(kern, block=BLOCK).dispatch(SEQ, chunk=CHUNK, doc=doc)
            result["mismatch"] = None
        except attnc.InputError as error:
            result["mismatch"] = error.reason
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = str(tmp_path_factory.mktemp("gloo") / "result")
    mp.spawn(_gloo_worker, args=(_port_file(), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


def test_unshard_gathers_every_ranks_shard_over_gloo(gloo_results: list[dict[str, Any]]) -> None:
    for result in gloo_results:
        assert torch.equal(result["unsharded"], result["full"])


def test_inputs_that_differ_across_ranks_are_an_error_on_every_rank(
    gloo_results: list[dict[str, Any]],
) -> None:
    for result in gloo_results:
        assert result["mismatch"] is not None
        assert "other arguments or inputs on rank(s) [1]" in result["mismatch"]
