"""Reusable plans: `kern(q, k, v, plan=plan)`, a plan shared by layers and by the backward, checked
against the call; plans built on the device without a host synchronisation, into buffers whose sizes
follow from the lengths; `plan.to_block_mask()`.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnc
from attnc.analysis.summaries import RangeTable
from attnc.errors import InputError
from attnc.runtime import autotune, launch
from attnc.runtime.plan import EMPTY, BlockSparse, metadata_builds

DOC = attnc.load("examples/document_causal.attn").document_causal()
SPARSE = attnc.load("examples/dynamic_sparse.attn")
BLOCK = (16, 16)


def documents(length: int, cuts: list[int]) -> torch.Tensor:
    ids = torch.zeros(1, length, dtype=torch.int32)
    for cut in cuts:
        ids[:, cut:] += 1
    return ids


def qkv(length: int, heads: int = 2, grad: bool = False) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(1, heads, length, 16, requires_grad=grad) for _ in range(3))


# ---- reuse ------------------------------------------------------------------------------------------------


def test_layers_and_their_backward_share_one_plan_built_once() -> None:
    doc = documents(40, [13, 29])
    q, k, v = qkv(40, grad=True)
    before = metadata_builds()
    out = q
    for _ in range(3):  # three layers, one document mask
        out = DOC(out, k, v, doc=doc)
    out.sum().backward()
    assert metadata_builds() - before == 1
    torch.testing.assert_close(q.grad, _reference_grad(doc), atol=1e-4, rtol=1e-4)


def _reference_grad(doc: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv(40, grad=True)
    out = q
    for _ in range(3):
        out = DOC.reference(out, k, v, doc=doc).float()
    out.sum().backward()
    assert q.grad is not None
    return q.grad


def test_a_given_plan_is_used_by_the_forward_and_the_backward_with_its_block() -> None:
    doc = documents(40, [7])
    plan = DOC.plan(40, 40, block=(32, 16), doc=doc)
    q, k, v = qkv(40, grad=True)
    before = metadata_builds()
    out = DOC(q, k, v, plan=plan, doc=doc)
    out.sum().backward()
    assert metadata_builds() == before  # the given plan served both
    kernels = DOC._forward
    assert (kernels.last_config.block_m, kernels.last_config.block_n) == (32, 16)
    assert (kernels.backward.last_config.block_m, kernels.backward.last_config.block_n) == (32, 16)
    torch.testing.assert_close(out, DOC.reference(q, k, v, doc=doc), atol=1e-5, rtol=1e-5)


def test_an_input_changed_in_place_gets_a_new_plan() -> None:
    doc = documents(40, [20])
    q, k, v = qkv(40)
    DOC(q, k, v, doc=doc)
    before = metadata_builds()
    doc[:, 10:] = 5  # a new document from 10 on: the version counter moves
    out = DOC(q, k, v, doc=doc)
    DOC(q, k, v, doc=doc)
    assert metadata_builds() - before == 1
    torch.testing.assert_close(out, DOC.reference(q, k, v, doc=doc), atol=1e-5, rtol=1e-5)


def test_other_lengths_or_parameter_values_get_their_own_plan() -> None:
    kern = attnc.loads(
        "pattern p(w: int = 4) { input doc: int32[KV_LEN]\n mask = doc[q] == doc[kv] and q - kv < w }"
    ).p()
    doc = documents(40, [9])[0]
    q, k, v = qkv(40)
    kern(q, k, v, doc=doc)
    before = metadata_builds()
    out = kern(q, k, v, doc=doc, w=20)
    kern(q, k, v, doc=doc, w=20)
    assert metadata_builds() - before == 1
    torch.testing.assert_close(out, kern.reference(q, k, v, doc=doc, w=20), atol=1e-5, rtol=1e-5)


def test_launch_plans_over_an_unchanged_input_summarise_it_once_and_anew_after_an_in_place_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Decoding steps each need a plan of their own (a new cache_seqlens, here a new q_offset), over
    # the same document ids: their range tables are built once, and again once the ids change.
    builds = []
    build = RangeTable.build
    monkeypatch.setattr(
        RangeTable, "build", staticmethod(lambda t, axis: builds.append(axis) or build(t, axis))
    )
    doc = documents(64, [20])
    q, k, v = (torch.randn(1, 1, n, 16) for n in (4, 64, 64))
    DOC(q, k, v, q_offset=16, doc=doc)
    first = len(builds)
    for offset in (4, 9):
        DOC(q, k, v, q_offset=offset, doc=doc)
    assert first > 0 and len(builds) == first
    doc[:, 40:] = 7
    out = DOC(q, k, v, q_offset=16, doc=doc)
    assert len(builds) == 2 * first
    torch.testing.assert_close(out, DOC.reference(q, k, v, q_offset=16, doc=doc), atol=1e-5, rtol=1e-5)


def test_an_explicit_plan_and_block_map_read_an_input_changed_behind_its_version_counter() -> None:
    # A write through .data (or NumPy, or a GPU kernel writing in place) does not move the version
    # counter: `kern.plan` and `kern.block_map` must still see the new values, never an earlier
    # summary of the same tensor.
    doc = documents(64, [20])
    before = DOC.plan(48, 64, block=BLOCK, q_offset=16, doc=doc).block_map()
    version = doc._version
    doc.data[:, 40:] = 7
    assert doc._version == version
    exact = DOC.block_map(48, 64, block=BLOCK, q_offset=16, doc=doc)
    after = DOC.plan(48, 64, block=BLOCK, q_offset=16, doc=doc).block_map()
    assert not torch.equal(after, before)
    assert torch.equal(after, exact)
    dense = DOC.mask(48, 64, q_offset=16, doc=doc)[0, 0]
    tiles = dense.unflatten(0, (3, 16)).unflatten(2, (4, 16)).transpose(1, 2).flatten(2)
    assert torch.equal(exact[0, 0] != EMPTY, tiles.any(-1))


# ---- a plan made for another call is an error -------------------------------------------------------------


def test_a_plan_for_other_lengths_is_refused() -> None:
    doc = documents(40, [7])
    plan = DOC.plan(32, 32, block=BLOCK, doc=doc[:, :32])
    q, k, v = qkv(40)
    with pytest.raises(
        InputError, match="made for q_len=32, kv_len=32, but this call has q_len=40, kv_len=40"
    ):
        DOC(q, k, v, plan=plan, doc=doc)


def test_a_plan_for_other_inputs_is_refused() -> None:
    doc = documents(40, [7])
    plan = DOC.plan(40, 40, block=BLOCK, doc=doc)
    q, k, v = qkv(40)
    with pytest.raises(InputError, match="another tensor as input 'doc'"):
        DOC(q, k, v, plan=plan, doc=doc.clone())


def test_a_plan_whose_input_changed_in_place_is_refused() -> None:
    doc = documents(40, [7])
    plan = DOC.plan(40, 40, block=BLOCK, doc=doc)
    doc[:, 30:] = 9
    q, k, v = qkv(40)
    with pytest.raises(InputError, match="input 'doc' as it was before an in-place change"):
        DOC(q, k, v, plan=plan, doc=doc)


def test_a_plan_for_other_parameter_values_batch_or_block_is_refused() -> None:
    window = attnc.stdlib().sliding_window(window=8)
    q, k, v = qkv(40)
    with pytest.raises(InputError, match="made for window=8, but this call has window=9"):
        window(q, k, v, plan=window.plan(40, 40), window=9)
    by_head = attnc.loads("pattern p { mask = (kv + h) % 3 == 0 }").p()
    with pytest.raises(InputError, match="made for num_heads=3, but this call has num_heads=2"):
        by_head(q, k, v, plan=by_head.plan(40, 40, num_heads=3))
    doc = documents(40, [7])
    with pytest.raises(InputError, match=r"block=\(8, 16\), but a launch needs powers of two"):
        DOC(q, k, v, plan=DOC.plan(40, 40, block=(8, 16), doc=doc), doc=doc)
    with pytest.raises(InputError, match="another pattern"):
        DOC(q, k, v, plan=window.plan(40, 40), doc=doc)
    with pytest.raises(InputError, match="plan must be a Plan"):
        DOC(q, k, v, plan="plan", doc=doc)


def test_under_torch_compile_a_plan_for_another_pattern_is_refused_also_after_a_trace_with_a_good_one() -> (
    None
):
    # The pattern is host data: checked while torch.compile traces the call, and a graph traced with
    # one plan is not reused for a plan of another pattern.
    causal = attnc.stdlib().causal()
    look_alike = attnc.loads("pattern p { mask = kv <= q }").p()  # the same mask, another pattern
    q, k, v = qkv(40)
    compiled = torch.compile(lambda q, k, v, plan: causal(q, k, v, plan=plan), backend="eager")
    torch.testing.assert_close(compiled(q, k, v, causal.plan(40, 40)), causal.reference(q, k, v))
    with pytest.raises(InputError, match="another pattern"):
        compiled(q, k, v, look_alike.plan(40, 40))


# ---- on the device, capturable ----------------------------------------------------------------------------

# Ops whose result size depends on tensor values, or that copy a value to the host: each would make a
# GPU build wait for the device, and none can be captured in a CUDA graph.
DATA_DEPENDENT = {
    "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique", "aten._unique2",
    "aten.unique_consecutive", "aten.unique_dim", "aten._local_scalar_dense", "aten.item",
    "aten.repeat_interleave", "aten.bincount", "aten.argwhere", "aten.masked_scatter",
}  # fmt: skip


class DataDependentOps(TorchDispatchMode):
    """Records every op with a data-dependent result size (and indexing by a bool mask) that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        )
        if name in DATA_DEPENDENT or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which", ["documents", "vertical-slash", "block map", "moba", "no input"])
def test_building_a_data_dependent_plan_never_synchronises_with_the_device(which: str) -> None:
    # Block maps and MoBA read boxes of blocks along two axes (4 x 4 blocks of 8 per 32 x 32 tile,
    # the query tiles shifted off the blocks by q_offset): how many follows from the tile size.
    g = torch.Generator().manual_seed(3)
    offset = 0
    if which in ("block map", "moba"):
        kern = SPARSE.block_sparse(block=8) if which == "block map" else SPARSE.moba(block=8)
        name, offset = ("blocks" if which == "block map" else "selected"), 5
        inputs = {name: torch.rand(2, 3, 39, 38, generator=g) < 0.2}
    elif which == "documents":
        kern = DOC
        inputs = {"doc": torch.sort(torch.randint(0, 4, (2, 300), generator=g), dim=1).values.int()}
    elif which == "vertical-slash":
        kern = SPARSE.vertical_slash()
        inputs = {
            "is_column": torch.rand(2, 3, 300, generator=g) < 0.1,
            "is_diagonal": torch.rand(2, 3, 300, generator=g) < 0.1,
        }
    else:
        kern, inputs = attnc.stdlib().dilated(window=2, dilation=20), {}
    with DataDependentOps() as ops:
        plan = kern.plan(300, 300, block=(32, 32), q_offset=offset, **inputs)
    assert not plan.analytic and ops.seen == []
    with DataDependentOps() as ops:  # what it would have seen
        torch.tensor([0, 1, 1]).nonzero()
        torch.tensor([3]).item()
    assert ops.seen == ["aten.nonzero", "aten._local_scalar_dense"]


def test_plan_buffer_sizes_follow_from_the_lengths_alone() -> None:
    shapes = set()
    for cuts in ([], [1], [5, 17, 63], list(range(0, 200, 3))):
        plan = DOC.plan(200, 200, block=BLOCK, doc=documents(200, cuts))
        shapes.add(tuple((name, tuple(t.shape)) for name, t in plan.tensors().items()))
    assert shapes == {
        (
            ("kv_partial_counts", (1, 1, 13)), ("kv_partial_indices", (1, 1, 13, 13)),
            ("kv_full_counts", (1, 1, 13)), ("kv_full_indices", (1, 1, 13, 13)),
            ("q_partial_counts", (1, 1, 13)), ("q_partial_indices", (1, 1, 13, 13)),
            ("q_full_counts", (1, 1, 13)), ("q_full_indices", (1, 1, 13, 13)),
        )
    }  # fmt: skip


# ---- FlexAttention's BlockMask ----------------------------------------------------------------------------


def block_mask_classes(mask: Any) -> torch.Tensor:
    """The tile classes a BlockMask holds, int8 [B, H, query tiles, key tiles]."""
    meta = BlockSparse(
        *mask.kv_indices.shape,
        mask.kv_num_blocks,
        mask.kv_indices,
        mask.full_kv_num_blocks,
        mask.full_kv_indices,
    )
    return meta.classes()


@pytest.mark.parametrize("which", ["metadata", "analytic"])
def test_to_block_mask_has_the_plans_tiles_and_flex_attention_with_it_matches_the_oracle(which: str) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    if which == "metadata":
        kern, inputs = DOC, {"doc": torch.cat([documents(40, [13, 29]), documents(40, [5])])}
    else:
        kern, inputs = attnc.loads("pattern p { mask = kv < 20 or (kv <= q and q - kv < 28) }").p(), {}
    plan = kern.plan(40, 40, block=BLOCK, batch=2, **inputs)
    mask = plan.to_block_mask()
    assert mask.BLOCK_SIZE == BLOCK and mask.seq_lengths == (40, 40)
    assert torch.equal(block_mask_classes(mask), plan.block_map())
    if which == "metadata":  # FlexAttention's transpose is the plan's
        assert torch.equal(mask.q_num_blocks, plan.q_tiles.partial_counts)
        assert torch.equal(mask.full_q_num_blocks, plan.q_tiles.full_counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention says it is unfused
        out = flex_attention(q, k, v, block_mask=mask)
    torch.testing.assert_close(out, kern.reference(q, k, v, **inputs), atol=1e-5, rtol=1e-5)


# ---- the launch configuration follows the plan's block ----------------------------------------------------


def test_on_a_gpu_a_plans_block_picks_the_configuration_and_a_backward_that_cannot_run_it_is_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launch, "_device_limits", lambda index: launch.DeviceLimits("a GPU", 228 * 1024, 90))
    monkeypatch.setenv("ATTNC_AUTOTUNE", "0")
    shape = autotune.LaunchShape("float16", 64, 64, 1, 4096, 4096, 32)
    device = torch.device("cuda", 0)

    def choose(block: tuple[int, int] | None, backward: bool) -> autotune.Config:
        return launch._config({}, "key", "p", "cuda", device, shape, lambda c: 1.0, backward, block)

    for backward in (False, True):
        free = choose(None, backward)
        blocks = {(c.block_m, c.block_n) for c in autotune.candidates(shape, 228 * 1024, backward)}
        assert len(blocks) > 1
        for block in blocks:
            config = choose(block, backward)
            assert (config.block_m, config.block_n) == block
        # A block no configuration has (it would not fit): the launch picks its own (the plan derives).
        assert choose((1024, 1024), backward) == free


def test_launches_with_another_block_derive_the_plans_metadata_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNC_CONFIG", "16,16")  # forces other tiles than the plan's
    doc = documents(40, [11])
    plan = DOC.plan(40, 40, block=(32, 32), doc=doc)
    q, k, v = qkv(40, grad=True)
    before = metadata_builds()
    out = q
    for _ in range(2):
        out = DOC(out, k, v, plan=plan, doc=doc)
    out.sum().backward()
    assert metadata_builds() - before == 1 and list(plan.derived) == [(16, 16)]
    torch.testing.assert_close(
        plan.derived[16, 16].block_map(), DOC.plan(40, 40, block=BLOCK, doc=doc).block_map()
    )


def test_on_a_gpu_autotuning_under_a_plan_measures_only_its_blocks_configurations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launch, "_device_limits", lambda index: launch.DeviceLimits("a GPU", 228 * 1024, 90))
    monkeypatch.setenv("ATTNC_AUTOTUNE", "1")
    shape = autotune.LaunchShape("float16", 64, 64, 1, 4096, 4096, 32)
    measured: list[autotune.Config] = []

    def seconds(config: autotune.Config) -> float:
        return config.num_warps * 10 + config.num_stages

    def measure(config: autotune.Config) -> float:
        measured.append(config)
        return seconds(config)

    key = f"test-{id(measured)}"
    config = launch._config({}, key, "p", "cuda", torch.device("cuda", 0), shape, measure, False, (64, 128))
    assert measured and {(c.block_m, c.block_n) for c in measured} == {(64, 128)}
    assert config == min(measured, key=seconds)
