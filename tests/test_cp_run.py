"""Context parallel attention over gloo (issue 22 items 2 and 3): `cp(q_loc, k_loc, v_loc, layout)` on 2
and 4 processes, forward and backward, judged by the float64 oracle on the whole sequence; the chunks
a rank receives; and the errors, raised on every rank.

Spawning processes that import torch and attnc costs seconds, so each world size spawns once
(`results_2`, `results_4`): the ranks run every case in turn, save what the tests compare, and the
tests read it. A case that failed on a rank saves its error, which the test of that case shows.
"""

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
from attnc.distributed import ContextParallel
from attnc.distributed import attention as cp_attention

ROOT = Path(__file__).resolve().parents[1]
BLOCK = (32, 32)  # the tiles the layout counts: those of the kernels under the interpreter
SEQ, CHUNK = 128, 32  # 4 chunks: 2 per rank on 2 ranks, 1 on 4
BATCH, HEADS, DIM = 2, 2, 16
IDLE_SEQ = 96  # 3 chunks over 4 ranks: rank 3 holds none

SHARE_QUESTION = """
pattern share_question {
    input group: int32[BATCH, KV_LEN]
    input answer: int32[BATCH, KV_LEN]
    mask = kv <= q and group[b, q] == group[b, kv] and (answer[b, kv] == 0 or answer[b, kv] == answer[b, q])
}
"""
SOFTCAP_BIAS = """
fn softcap(x: float, cap: float) = cap * tanh(x / cap)
pattern softcap_bias(cap: float = 2.0) {
    input slope: float32[NUM_HEADS]
    mask = kv <= q
    score = softcap(s, cap) - slope[h] * (q - kv) * 0.05
}
"""

CASES_2 = ["causal", "sliding", "document", "prefix_lm", "share_question", "neighborhood_2d", "softcap_bias"]
CASES_4 = ["causal", "document", "gqa", "idle_rank", "longformer"]
# Cases dispatched at other sizes. Longformer-style (global tokens and a window) over 8 chunks of 32
# on 4 ranks, counted in 16 x 16 tiles: the chunk holding the global tokens costs more than a rank's
# share, so the dispatch splits it by its keys (`Part`s computed by other ranks, each over two runs
# of key chunks, merged by lse on its owner, which receives some of its own keys from another rank).
DISPATCH = {"longformer": {"block": (16, 16), "chunk": 32}}
LONG_SEQ = 256
ERRORS = [
    "chunking",
    "short_shard",
    "batch",
    "group_size",
    "inputs_differ",
    "cross_length",
    "mask_input_other_than_dispatched",
    "runtime_parameter_other_than_dispatched",
    "layout_of_another_kernel",
]


def segments(lengths: list[int]) -> list[int]:
    return [i for i, n in enumerate(lengths) for _ in range(n)]


def case(name: str) -> tuple[attnc.Kernel, dict[str, Any], int, int]:
    """A case's kernel, inputs (the whole sequence's), sequence length and key/value heads."""
    std = attnc.stdlib()
    generator = torch.Generator().manual_seed(1)
    if name in ("causal", "idle_rank"):
        return std.causal(), {}, IDLE_SEQ if name == "idle_rank" else SEQ, HEADS
    if name == "gqa":
        return std.causal(), {}, SEQ, 1
    if name == "sliding":
        return std.sliding_window(window=20), {}, SEQ, HEADS
    if name == "prefix_lm":
        return std.prefix_lm(prefix=35), {}, SEQ, HEADS
    if name == "neighborhood_2d":  # an 8 x 16 image, 3 x 3 neighbourhoods
        return std.neighborhood_2d(height=8, width=16, kernel_h=3, kernel_w=3), {}, SEQ, HEADS
    if name == "document":  # random documents per batch row
        rows = []
        for _ in range(BATCH):
            cuts = sorted(torch.randperm(SEQ - 1, generator=generator)[:4].add(1).tolist())
            rows.append(segments([b - a for a, b in zip([0, *cuts], [*cuts, SEQ], strict=True)]))
        doc = torch.tensor(rows, dtype=torch.int32)
        return (
            attnc.load(ROOT / "examples" / "document_causal.attn").document_causal(),
            {"doc": doc},
            SEQ,
            HEADS,
        )
    if name == "share_question":  # row 0: a question of 30 and answers of 25, 35; then 38 in one
        group = segments([90, 38])
        answer = [0] * 30 + [1] * 25 + [2] * 35 + [0] * 15 + [1] * 23
        inputs = {
            "group": torch.tensor([group, group[::-1]], dtype=torch.int32),
            "answer": torch.tensor([answer, answer], dtype=torch.int32),
        }
        return attnc.loads(SHARE_QUESTION).share_question(), inputs, SEQ, HEADS
    if name == "longformer":  # 4 global tokens per row (and one more in row 1), a window of 6
        is_global = torch.zeros((BATCH, LONG_SEQ), dtype=torch.bool)
        is_global[:, :4] = True
        is_global[1, 50] = True
        kern = attnc.load(ROOT / "examples" / "longformer.attn").longformer_global(w=6)
        return kern, {"is_global": is_global}, LONG_SEQ, HEADS
    if name == "softcap_bias":
        slope = torch.tensor([0.5, -0.3], requires_grad=True)
        return attnc.loads(SOFTCAP_BIAS).softcap_bias(), {"slope": slope}, SEQ, HEADS
    raise AssertionError(name)


def tensors(seq_len: int, kv_heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v and the output's gradient of the whole sequence, the same in every process."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, seq_len, DIM, generator=generator)
    k, v = (torch.randn(BATCH, kv_heads, seq_len, DIM, generator=generator) for _ in range(2))
    return q, k, v, torch.randn(BATCH, HEADS, seq_len, DIM, generator=generator)


def run_case(name: str, receives: list[int], through_unshard: bool = False) -> dict[str, Any]:
    """This rank's part of a case: outputs, lse and gradients of its shard, and the float inputs'
    gradients (whole on every rank); `through_unshard`: of the loss over the whole (unsharded) output,
    the same on every rank."""
    kern, inputs, seq_len, kv_heads = case(name)
    q, k, v, grad = tensors(seq_len, kv_heads)
    options = DISPATCH.get(name, {})
    cp = ContextParallel(kern, block=options.get("block", BLOCK))
    layout = cp.dispatch(seq_len, batch=BATCH, num_heads=HEADS, chunk=options.get("chunk", CHUNK), **inputs)
    q_loc, k_loc, v_loc = (layout.shard(t).requires_grad_() for t in (q, k, v))
    del receives[:]
    out, lse = cp(q_loc, k_loc, v_loc, layout, return_lse=True, **inputs)
    forward_receives = list(receives)
    if through_unshard:
        (layout.unshard(out) * grad).sum().backward()
    else:
        (out * layout.shard(grad)).sum().backward()
    result = {
        "index": layout.token_index(),
        "held": layout.chunks(),
        "parts": [(p.q_chunk, p.helper) for p in layout.parts],
        "owner": layout.owner,
        "out": out.detach(),
        "lse": lse,
        "dq": q_loc.grad,
        "dk": k_loc.grad,
        "dv": v_loc.grad,
        "received_chunks": sum(forward_receives) // (2 * BATCH * kv_heads * CHUNK * DIM),
    }
    result.update(
        {f"d{n}": t.grad for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    )
    return result


def run_inference(name: str) -> torch.Tensor:
    """This rank's output of a case without autograd (under `torch.no_grad`)."""
    kern, inputs, seq_len, kv_heads = case(name)
    q, k, v, _ = tensors(seq_len, kv_heads)
    cp = ContextParallel(kern, block=BLOCK)
    layout = cp.dispatch(seq_len, batch=BATCH, num_heads=HEADS, chunk=CHUNK, **inputs)
    return cp(*(layout.shard(t).requires_grad_() for t in (q, k, v)), layout, **inputs)


def run_backward_twice(double: bool) -> str | None:
    """This rank's error message of a second backward through one call, or (`double`) of a double
    backward (None: no error)."""
    kern, _, seq_len, kv_heads = case("causal")
    q, k, v, grad = tensors(seq_len, kv_heads)
    cp = ContextParallel(kern, block=BLOCK)
    layout = cp.dispatch(seq_len, batch=BATCH, num_heads=HEADS, chunk=CHUNK)
    q_loc, k_loc, v_loc = (layout.shard(t).requires_grad_() for t in (q, k, v))
    loss = (cp(q_loc, k_loc, v_loc, layout) * layout.shard(grad)).sum()
    try:
        if double:  # a gradient penalty: its second-order term must not silently vanish
            (dq,) = torch.autograd.grad(loss, q_loc, create_graph=True)
            (dq.square().sum() + k_loc.sum()).backward()
            return None
        loss.backward(retain_graph=True)
        loss.backward()
        return None
    except Exception as error:  # the test shows which
        return f"{type(error).__name__}: {error}"


def run_error(name: str, rank: int) -> str | None:
    """This rank's error message of an erroneous call (None: no error)."""
    kern, inputs, seq_len, _ = case("document")
    q, k, v, _ = tensors(seq_len, HEADS)
    cp = ContextParallel(kern, block=BLOCK)
    try:
        if name == "chunking":
            ContextParallel(case("causal")[0], block=(16, 16)).dispatch(seq_len - 16, chunk=CHUNK)
            return None
        layout = cp.dispatch(seq_len, batch=BATCH, num_heads=HEADS, chunk=CHUNK, **inputs)
        q_loc, k_loc, v_loc = (layout.shard(t) for t in (q, k, v))
        if name == "short_shard" and rank == 1:
            q_loc = q_loc[:, :, 1:]
        if name == "batch":
            q_loc, k_loc, v_loc = (t[:1] for t in (q_loc, k_loc, v_loc))
        if name == "inputs_differ" and rank == 1:
            inputs = {"doc": inputs["doc"].clone().fill_(0)}
        if name == "mask_input_other_than_dispatched":  # one document: every chunk visits its past
            inputs = {"doc": torch.zeros_like(inputs["doc"])}
        if name == "runtime_parameter_other_than_dispatched":  # a wider window than dispatched
            cp = ContextParallel(attnc.stdlib().sliding_window(window=8), block=BLOCK)
            layout = cp.dispatch(seq_len, batch=BATCH, num_heads=HEADS, chunk=CHUNK)
            inputs = {"window": 60}
        if name == "layout_of_another_kernel":  # a causal layout for a prefix LM's future keys
            cp = ContextParallel(attnc.stdlib().prefix_lm(prefix=100), block=BLOCK)
            inputs = {}
        if name == "cross_length":  # twice as many keys as queries
            k_loc, v_loc = (torch.cat([t, t], dim=2) for t in (k_loc, v_loc))
        if name == "group_size":  # a layout of the 2-rank WORLD on a group of 1
            singles = [dist.new_group([r]) for r in range(2)]
            cp = ContextParallel(kern, singles[rank], block=BLOCK)
        cp(q_loc, k_loc, v_loc, layout, **inputs)
        return None
    except attnc.InputError as error:
        return error.reason


def _worker(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    receives: list[int] = []
    p2p = cp_attention._p2p

    def counting(call: Any, sends: Any, incoming: Any) -> Any:
        receives.extend(t.numel() for _, t in incoming)
        return p2p(call, sends, incoming)

    cp_attention._p2p = counting
    try:
        results: dict[str, Any] = {}
        # Errors first: the cases after them show that every rank left the group usable.
        for name in ERRORS if world_size == 2 else []:
            results[f"error:{name}"] = run_error(name, rank)
        for name in CASES_2 if world_size == 2 else CASES_4:
            try:
                results[name] = run_case(name, receives)
            except Exception as error:  # shown by the test of the case
                results[name] = f"{type(error).__name__}: {error}"
        if world_size == 2:  # the same layout and tensors again: the same bits
            results["document_again"] = run_case("document", receives)
            try:
                results["document_unshard"] = run_case("document", receives, through_unshard=True)
            except Exception as error:  # shown by the test
                results["document_unshard"] = f"{type(error).__name__}: {error}"
            with torch.no_grad():
                results["inference"] = run_inference("document")
            results["backward_twice"] = run_backward_twice(double=False)
            results["double_backward"] = run_backward_twice(double=True)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def spawn(world_size: int, directory: Path) -> list[dict[str, Any]]:
    handle, store = tempfile.mkstemp(prefix="attnc-cp-run-")
    os.close(handle)
    os.unlink(store)  # the FileStore creates it
    out = str(directory / "result")
    mp.spawn(_worker, args=(world_size, store, out), nprocs=world_size, join=True)
    return [torch.load(f"{out}.{rank}") for rank in range(world_size)]


@pytest.fixture(scope="module")
def results_2(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(2, tmp_path_factory.mktemp("cp2"))


@pytest.fixture(scope="module")
def results_4(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(4, tmp_path_factory.mktemp("cp4"))


def whole(results: list[dict[str, Any]], name: str, key: str, seq_len: int) -> torch.Tensor:
    """The whole sequence's tensor from every rank's shard of it."""
    for r in results:
        assert not isinstance(r[name], str), r[name]
    shards = [r[name][key] for r in results]
    index = torch.cat([r[name]["index"] for r in results])
    pieces = torch.cat(shards, dim=2)
    return torch.empty_like(pieces).index_copy_(2, index, pieces)


def check_against_oracle(results: list[dict[str, Any]], name: str) -> None:
    kern, inputs, seq_len, kv_heads = case(name)
    q, k, v, grad = tensors(seq_len, kv_heads)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    floats = {n: t for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    float_leaves = {n: t.detach().double().requires_grad_() for n, t in floats.items()}
    inputs64 = {**inputs, **{n: t.float() for n, t in float_leaves.items()}}  # declared float32
    out, lse = kern.reference(*leaves, return_lse=True, **inputs64)
    wanted = torch.autograd.grad(out, [*leaves, *float_leaves.values()], grad.double())
    torch.testing.assert_close(whole(results, name, "out", seq_len).double(), out, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(
        whole(results, name, "lse", seq_len).double(), lse.double(), atol=2e-5, rtol=2e-6
    )
    for key, want in zip(("dq", "dk", "dv"), wanted, strict=False):
        torch.testing.assert_close(whole(results, name, key, seq_len).double(), want, atol=5e-5, rtol=5e-5)
    for (n, _), want in zip(floats.items(), wanted[3:], strict=True):
        for r in results:  # every rank holds the whole gradient
            torch.testing.assert_close(r[name][f"d{n}"].double(), want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("name", CASES_2)
def test_two_ranks_give_the_oracles_output_lse_and_gradients(results_2, name: str) -> None:
    check_against_oracle(results_2, name)


@pytest.mark.parametrize("name", CASES_4)
def test_four_ranks_give_the_oracles_output_lse_and_gradients(results_4, name: str) -> None:
    check_against_oracle(results_4, name)


def test_a_rank_without_chunks_takes_part_and_returns_nothing(results_4) -> None:
    assert [len(r["idle_rank"]["held"]) for r in results_4] == [1, 1, 1, 0]
    assert results_4[3]["idle_rank"]["out"].shape == (BATCH, HEADS, 0, DIM)


def test_a_heavy_query_chunk_is_split_over_ranks(results_4) -> None:
    # The Longformer case above runs split: its oracle test covers the parts' exchange and merge.
    result = results_4[0]["longformer"]
    assert result["parts"]
    assert all(helper != result["owner"][q_chunk] for q_chunk, helper in result["parts"])


def test_the_same_call_gives_the_same_bits(results_2) -> None:
    for r in results_2:
        for key in ("out", "lse", "dq", "dk", "dv"):
            assert torch.equal(r["document"][key], r["document_again"][key])


def test_under_no_grad_the_output_is_the_same(results_2) -> None:
    for r in results_2:
        assert torch.equal(r["inference"], r["document"]["out"])


@pytest.mark.parametrize("name", ["sliding", "document", "neighborhood_2d"])
def test_a_rank_receives_exactly_the_chunks_its_queries_visit(results_2, name: str) -> None:
    kern, inputs, seq_len, _ = case(name)
    classes = kern.block_map(seq_len, seq_len, block=BLOCK, batch=BATCH, num_heads=HEADS, **inputs)
    n, t = seq_len // CHUNK, CHUNK // BLOCK[0]
    visits = (classes > 0).any(1).any(0).reshape(n, t, n, t).any(3).any(1)  # [query chunk, key chunk]
    for r in results_2:
        held = list(r[name]["held"])
        needed = visits[held].any(0)
        needed[held] = False
        assert r[name]["received_chunks"] == int(needed.sum())


def error_on_every_rank(results: list[dict[str, Any]], name: str) -> list[str]:
    messages = [r[f"error:{name}"] for r in results]
    assert all(m is not None for m in messages), messages
    return messages


def test_seq_len_not_a_multiple_of_the_chunk_is_an_error_on_every_rank(results_2) -> None:
    for message in error_on_every_rank(results_2, "chunking"):
        assert "seq_len=112 is not a multiple of chunk=32" in message


def test_a_shard_of_the_wrong_length_is_an_error_on_every_rank(results_2) -> None:
    for message in error_on_every_rank(results_2, "short_shard"):
        assert message.startswith("cp(...) arguments rejected on rank 1: q holds 63 tokens")


def test_a_batch_other_than_the_dispatched_is_an_error_on_every_rank(results_2) -> None:
    for message in error_on_every_rank(results_2, "batch"):
        assert "q has batch 1 and 2 heads, but the layout was dispatched for batch=2" in message


def test_a_group_of_another_size_than_the_layouts_is_an_error_on_every_rank(results_2) -> None:
    for message in error_on_every_rank(results_2, "group_size"):
        assert "the layout is for 2 ranks, but the process group has 1" in message


def test_inputs_that_differ_across_ranks_are_an_error_on_every_rank(results_2) -> None:
    for message in error_on_every_rank(results_2, "inputs_differ"):
        assert "inputs on rank(s) [1] than on rank 0" in message


def test_cross_lengths_are_an_error_on_every_rank(results_2) -> None:
    for message in error_on_every_rank(results_2, "cross_length"):
        assert "context parallel is self-attention" in message


OTHER_MASKS = [
    "mask_input_other_than_dispatched",
    "runtime_parameter_other_than_dispatched",
    "layout_of_another_kernel",
]


@pytest.mark.parametrize("name", OTHER_MASKS)
def test_a_mask_other_than_the_dispatched_is_an_error_on_every_rank(results_2, name: str) -> None:
    # The layout exchanges the chunks the dispatched mask visits: another would silently miss keys.
    for message in error_on_every_rank(results_2, name):
        assert "dispatched for another kernel, or other inputs or runtime parameters of its mask" in message


def test_a_second_backward_through_one_call_is_an_error_on_every_rank(results_2) -> None:
    messages = [r["backward_twice"] for r in results_2]
    assert all(m is not None and "backward ran a second time" in m for m in messages), messages


def test_double_backward_is_an_error_on_every_rank(results_2) -> None:
    messages = [r["double_backward"] for r in results_2]
    assert all(m is not None and "does not support double backward" in m for m in messages), messages


def test_a_loss_over_the_unsharded_output_gives_each_rank_its_shards_gradients(results_2) -> None:
    # Every rank computes the same loss over layout.unshard(out): each gets the gradient of its shard.
    for r in results_2:
        assert not isinstance(r["document_unshard"], str), r["document_unshard"]
        for key in ("dq", "dk", "dv"):
            torch.testing.assert_close(r["document_unshard"][key], r["document"][key])
