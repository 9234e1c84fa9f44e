"""The runnable Python examples in examples/*.py, imported and run with tiny sizes (their kernels run
under Triton's interpreter without a GPU), and once each as a script."""

from __future__ import annotations

import itertools
import subprocess
import sys

import torch
from cases import DEVICE, EXAMPLES, example_script

SCRIPTS = {  # each script -> command-line arguments small enough for a test
    "bigbird": ["--seq-len", "64", "--block", "8"],
    "image_neighborhood": ["--height", "5", "--width", "6", "--kernel", "3"],
    "moba_selection": ["--length", "48", "--block", "8", "--top-k", "2"],
    "packed_documents": ["3", "1", "7"],
    "train_sliding_window": ["--steps", "2", "--length", "16"],
    "transformers_tiny": ["--length", "8", "--new-tokens", "2"],
}


def test_every_script_is_tested_here() -> None:
    # __init__.py makes the directory the package `attnc.examples`; it is no script.
    assert {p.stem for p in EXAMPLES.glob("*.py") if p.stem != "__init__"} == set(SCRIPTS)


def test_scripts_run_as_main_with_their_command_line() -> None:
    # One interpreter runs them all (as `python examples/STEM.py ARGS` would), to pay torch's import once.
    runs = [(str(EXAMPLES / f"{stem}.py"), args) for stem, args in sorted(SCRIPTS.items())]
    driver = (
        "import runpy, sys\n"
        f"for path, args in {runs!r}:\n"
        "    sys.argv = [path, *args]\n"
        "    print(f'=== {path}', flush=True)\n"
        "    runpy.run_path(path, run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    outputs = result.stdout.split("=== ")[1:]
    assert [o.splitlines()[0] for o in outputs] == [str(EXAMPLES / f"{stem}.py") for stem in sorted(SCRIPTS)]
    assert all(len(o.splitlines()) > 1 for o in outputs) and "MISMATCH" not in result.stdout


# ---- training with a sliding window and sinks -------------------------------------------------------------


def test_training_lowers_the_loss() -> None:
    train = example_script("train_sliding_window")
    losses = train.main(steps=4, batch=2, length=24, dim=32, heads=2, window=6, sinks=2)
    assert len(losses) == 4
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))


def test_attention_layer_gradients_equal_the_oracles() -> None:
    train = example_script("train_sliding_window")
    torch.manual_seed(0)
    layer = train.SlidingWindowAttention(dim=32, heads=2, window=5, sinks=2).to(DEVICE)
    x = torch.randn(2, 20, 32, device=DEVICE)

    def weight_grads() -> list[torch.Tensor]:
        layer.zero_grad()
        layer(x).square().sum().backward()
        return [layer.qkv.weight.grad.clone(), layer.out.weight.grad.clone()]

    kernel_grads = weight_grads()
    kernel = layer.kernel
    layer.kernel = lambda q, k, v: kernel.reference(q, k, v)  # the dense float64 oracle, differentiable
    for actual, expected in zip(kernel_grads, weight_grads(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# ---- packed documents --------------------------------------------------------------------------------------


def test_document_ids_from_lengths() -> None:
    ids = example_script("packed_documents").document_ids([2, 3, 1])
    assert ids.dtype == torch.int32 and ids.tolist() == [0, 0, 1, 1, 1, 2]


def test_packed_documents_equal_each_document_alone() -> None:
    assert example_script("packed_documents").main([3, 1, 12, 8]) < 1e-5


# ---- 2-D neighbourhood attention over a feature map ----------------------------------------------------


def test_image_neighborhood_keeps_the_feature_map_shape() -> None:
    out = example_script("image_neighborhood").main(height=6, width=8, channels=16, heads=2, kernel=3)
    assert out.shape == (2, 16, 6, 8) and torch.isfinite(out).all()


def test_image_neighborhood_pixels_see_only_their_neighbourhood() -> None:
    # The flattening is row-major: changing pixel (0, 0) changes exactly the pixels whose 3 x 3 window
    # holds it. Windows are shifted inward at the borders: rows (and columns) 0 and 1 both see 0, 1, 2.
    module = example_script("image_neighborhood")
    torch.manual_seed(0)
    layer = module.NeighborhoodAttention2d(channels=16, heads=2, height=6, width=8, kernel=3).to(DEVICE)
    image = torch.randn(1, 16, 6, 8, device=DEVICE)
    changed = image.clone()
    changed[0, :, 0, 0] += 5.0
    with torch.no_grad():
        moved = (layer(changed) - layer(image)).abs().amax(dim=1)[0] > 1e-6  # [6, 8]
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(moved, expected)


# ---- MoBA-style block selection ------------------------------------------------------------------------


def test_moba_selects_the_top_k_past_blocks_by_mean_pooled_scores() -> None:
    moba = example_script("moba_selection")
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 45, 8, generator=g), torch.randn(1, 2, 45, 8, generator=g)
    selected = moba.select_blocks(q, k, block=8, top_k=2)  # 6 blocks, the last one 5 long
    assert selected.shape == (1, 2, 6, 6)
    for h in range(2):
        q_means = [q[0, h, i : i + 8].mean(dim=0) for i in range(0, 45, 8)]
        k_means = [k[0, h, i : i + 8].mean(dim=0) for i in range(0, 45, 8)]
        for qb in range(6):
            scores = {kb: float(q_means[qb] @ k_means[kb]) for kb in range(qb)}
            best = sorted(scores, key=scores.get, reverse=True)[:2]
            assert sorted(selected[0, h, qb].nonzero().flatten().tolist()) == sorted(best)


def test_moba_example_runs_its_kernel_against_the_oracle() -> None:
    selected = example_script("moba_selection").main(length=40, block=8, top_k=1, heads=2, dim=16)
    assert selected.sum(dim=-1).tolist() == [[[0, 1, 1, 1, 1]] * 2]


# ---- BigBird -----------------------------------------------------------------------------------------------


def test_bigbird_example_runs_its_kernel_against_the_oracle() -> None:
    density = example_script("bigbird").main(seq_len=96, block=8)
    assert 0.0 < density < 1.0
