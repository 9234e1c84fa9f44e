"""`attnc show`: the tile map as characters, its counts and grouping, random inputs, the PNG, and errors
without tracebacks. Maps are written out row by row, as they print."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
import torch

import attnc
from attnc.cli import main
from attnc.runtime.plan import EMPTY, FULL, PARTIAL
from attnc.show import ShowError, group_tiles, random_inputs, render, tile_view

EXAMPLES = Path(__file__).parents[1] / "examples"
STREAMING = str(EXAMPLES / "streaming_llm.attn")  # its module reaches the stdlib patterns too
DOCUMENT = str(EXAMPLES / "document_causal.attn")
MAP_CHARS = set(".+#")


def show(capsys: pytest.CaptureFixture[str], file: str | Path, args: str, *more: str) -> str:
    """Run `attnc show FILE ARGS... MORE...` (ARGS split on spaces); it must succeed. Its stdout."""
    assert main(["show", str(file), *args.split(), *more]) == 0
    return capsys.readouterr().out


def tile_map(out: str) -> list[str]:
    """The map's rows: the indented lines made of map characters only."""
    return [line[2:] for line in out.splitlines() if line.startswith("  ") and set(line[2:]) <= MAP_CHARS]


def line_starting(out: str, prefix: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(prefix)]
    return line


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the header of a file that must be a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_causal_map_counts_and_header(capsys: pytest.CaptureFixture[str]) -> None:
    out = show(capsys, STREAMING, "-p causal --q-len 256 --block 64,64")
    assert (
        out.splitlines()[0] == "causal: q_len 256 x kv_len 256, block 64x64, sparsity analytic (no metadata)"
    )
    assert tile_map(out) == [
        "+...",
        "#+..",
        "##+.",
        "###+",
    ]
    assert "legend: '.' EMPTY  '+' PARTIAL  '#' FULL" in out
    assert line_starting(out, "tiles:") == "tiles: 6 EMPTY, 4 PARTIAL, 6 FULL (16 in all)"
    assert line_starting(out, "density:") == "density: 62.5% of tiles visited (PARTIAL or FULL), 37.5% FULL"
    assert "each character is" not in out


def test_parameters_are_applied_and_shown(capsys: pytest.CaptureFixture[str]) -> None:
    out = show(capsys, STREAMING, "-p streaming_llm -D window=64 -D sinks=1 --q-len 256 --block 64,64")
    assert out.startswith("streaming_llm(window=64, sinks=1): q_len 256 x kv_len 256, block 64x64")
    assert tile_map(out) == [
        "+...",
        "++..",
        "+++.",
        "+.++",
    ]


def test_non_square_lengths_and_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    out = show(capsys, STREAMING, "-p causal --q-len 100 --kv-len 150 --block 32,64")
    assert "q_len 100 x kv_len 150, block 32x64" in out
    # Query tiles of 32 (the last one 4 long), key tiles of 64 (the last one 22 long).
    assert tile_map(out) == [
        "+..",
        "+..",
        "#+.",
        "#+.",
    ]
    assert line_starting(out, "tiles:") == "tiles: 6 EMPTY, 4 PARTIAL, 2 FULL (12 in all)"


def test_kv_len_defaults_to_q_len(capsys: pytest.CaptureFixture[str]) -> None:
    out = show(capsys, STREAMING, "-p causal_bottom_right --q-len 128 --block 64,64")
    assert "q_len 128 x kv_len 128" in out
    assert tile_map(out) == ["+.", "#+"]


def test_grouping_keeps_the_map_within_64_characters(capsys: pytest.CaptureFixture[str]) -> None:
    # 8 x 130 tiles: groups of 1 x 3 tiles, 8 x 44 characters; the last group holds one tile.
    out = show(capsys, STREAMING, "-p causal --q-len 128 --kv-len 2080 --block 16,16")
    assert "8 x 130 tiles; each character is 1x3 tiles" in out
    assert tile_map(out) == [
        "+" + "." * 43,
        "+" + "." * 43,
        "+" + "." * 43,
        "#+" + "." * 42,
        "#+" + "." * 42,
        "#+" + "." * 42,
        "##+" + "." * 41,
        "##+" + "." * 41,
    ]
    # Counts are of the tiles, not of the groups.
    assert line_starting(out, "tiles:") == "tiles: 1004 EMPTY, 8 PARTIAL, 28 FULL (1040 in all)"


@pytest.mark.parametrize(
    ("count", "first"),
    [
        (16, "+"),  # a FULL tile and an EMPTY one: PARTIAL
        (32, "#"),  # two FULL tiles: FULL
        (8, "+"),  # a PARTIAL tile and an EMPTY one: PARTIAL
    ],
)
def test_a_group_is_full_or_empty_only_when_all_its_tiles_are(
    capsys: pytest.CaptureFixture[str], count: int, first: str
) -> None:
    out = show(capsys, STREAMING, f"-p sinks -D count={count} --q-len 1600 --block 16,16")
    assert "100 x 100 tiles; each character is 2x2 tiles" in out
    assert tile_map(out) == [first + "." * 49] * 50


def test_group_tiles_literal() -> None:
    classes = torch.tensor(
        [
            [2, 2, 0, 0, 1],
            [2, 2, 0, 1, 0],
            [2, 0, 0, 0, 0],
        ],
        dtype=torch.int8,
    )
    grouped, factors = group_tiles(classes, limit=3)
    assert factors == (1, 2)
    assert grouped.tolist() == [
        [FULL, EMPTY, PARTIAL],
        [FULL, PARTIAL, EMPTY],
        [PARTIAL, EMPTY, EMPTY],
    ]
    same, factors = group_tiles(classes, limit=5)
    assert factors == (1, 1) and same is classes


def test_batch_row_and_head_select_the_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "shifted.attn"
    path.write_text("pattern shifted {\n    mask = kv + 64 * (b + 2 * h) <= q\n}\n")
    common = "-p shifted --q-len 256 --block 64,64"
    assert tile_map(show(capsys, path, common)) == ["+...", "#+..", "##+.", "###+"]
    out = show(capsys, path, common, "--batch", "1")
    assert "tile map of batch row 1, head 0" in out
    assert tile_map(out) == ["....", "+...", "#+..", "##+."]
    assert tile_map(show(capsys, path, common, "--head", "1")) == ["....", "....", "+...", "#+.."]


def test_a_pattern_with_inputs_needs_random_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", DOCUMENT, "-p", "document_causal", "--q-len", "256"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "attnc: error: pattern 'document_causal' needs input tensors (doc); "
        "pass --random-inputs SEED to show it on random ones\n"
    )


def test_random_inputs_show_a_document_mask(capsys: pytest.CaptureFixture[str]) -> None:
    args = "-p document_causal --q-len 512 --block 32,32 --random-inputs"
    out = show(capsys, DOCUMENT, args, "0")
    assert out.startswith("document_causal: q_len 512 x kv_len 512, block 32x32, sparsity metadata[b] (8 ")
    assert "inputs: doc int32[1, 512], random (seed 0)" in out
    rows = tile_map(out)
    assert len(rows) == 16 and all(len(row) == 16 for row in rows)
    # Causal within documents: the diagonal is PARTIAL with nothing above it, and several documents
    # leave EMPTY tiles below it.
    assert all(row[i] == "+" and set(row[i + 1 :]) <= {"."} for i, row in enumerate(rows))
    assert any("." in row[:i] for i, row in enumerate(rows))
    text = "".join(rows)
    assert line_starting(out, "tiles:") == (
        f"tiles: {text.count('.')} EMPTY, {text.count('+')} PARTIAL, {text.count('#')} FULL (256 in all)"
    )
    assert show(capsys, DOCUMENT, args, "0") == out  # the seed decides the inputs
    assert tile_map(show(capsys, DOCUMENT, args, "1")) != rows


def test_random_inputs_follow_the_declared_shapes() -> None:
    kernel = attnc.loads(
        "pattern p(m: int) {\n"
        "    input doc: int32[BATCH, KV_LEN]\n"
        "    input keep: bool[NUM_HEADS, Q_LEN]\n"
        "    input bias: float16[2 * m + 1]\n"
        "    mask = doc[b, q] == doc[b, kv] and keep[h, q]\n"
        "    score = s + bias[0]\n"
        "}\n"
    ).p(m=3)
    sizes = {"BATCH": 2, "NUM_HEADS": 3, "Q_LEN": 40, "KV_LEN": 800}
    inputs = random_inputs(kernel, sizes, seed=5)
    doc, keep, bias = inputs["doc"], inputs["keep"], inputs["bias"]
    assert (doc.dtype, doc.shape) == (torch.int32, (2, 800))
    assert (keep.dtype, keep.shape) == (torch.bool, (3, 40))
    assert (bias.dtype, bias.shape) == (torch.float16, (7,))
    steps = doc[:, 1:] - doc[:, :-1]
    assert (doc[:, 0] == 0).all() and ((steps == 0) | (steps == 1)).all()  # sorted ids from 0
    assert 2 < int(doc[:, -1].max()) < 40  # about 8 documents a row
    assert 0.3 < keep.float().mean() < 0.7
    again = random_inputs(kernel, sizes, seed=5)
    assert all(torch.equal(inputs[name], again[name]) for name in inputs)


def test_png_with_the_mask_panel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "map.png"
    out = show(capsys, STREAMING, "-p streaming_llm -D window=128 --q-len 512 --block 64,64 --png", str(png))
    assert out.endswith(f"wrote {png}\n")
    width, height = png_size(png)
    assert width > 1.8 * height  # two panels side by side


def test_png_without_the_mask_panel_for_long_sequences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "doc.png"
    show(capsys, DOCUMENT, "-p document_causal --q-len 4096 --random-inputs 0 --png", str(png))
    width, height = png_size(png)
    assert width < 1.5 * height  # the tile map alone: a 4096 x 4096 mask is too large to draw


def test_png_without_matplotlib_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in sys.modules if n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    png = tmp_path / "x.png"
    assert main(["show", STREAMING, "-p", "causal", "--q-len", "64", "--png", str(png)]) == 1
    assert (
        "attnc: error: attnc show --png needs matplotlib (pip install matplotlib)" in capsys.readouterr().err
    )
    assert not png.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("-p causal --q-len 0", "attnc: error: q_len must be at least 1, got 0"),
        ("-p causal --q-len 8 --kv-len -3", "attnc: error: kv_len must be at least 1, got -3"),
        ("-p causal --q-len 8 --block 0,16", "attnc: error: block must be two positive ints BM,BN, got 0,16"),
        ("-p causal --q-len 8 --batch -1", "attnc: error: batch must be at least 0, got -1"),
        ("-p causal --q-len 8 --head -1", "attnc: error: head must be at least 0, got -1"),
        ("-p casual --q-len 8", "attnc: error: no pattern 'casual'; patterns: streaming_llm"),
        ("-p streaming_llm --q-len 8 -D windw=2", "error: pattern 'streaming_llm' has no parameter 'windw'"),
        ("-p causal --q-len 8 --png /nonexistent/dir/x.png", "attnc: error: cannot write /nonexistent/dir"),
    ],
)
def test_bad_arguments_exit_1_without_a_traceback(
    capsys: pytest.CaptureFixture[str], args: str, message: str
) -> None:
    assert main(["show", STREAMING, *args.split()]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--q-len 8", "the following arguments are required: -p/--pattern"),
        ("-p causal", "the following arguments are required: --q-len"),
        ("-p causal --q-len 8 --block 16", "argument --block: expected BM,BN (two ints), got '16'"),
        ("-p causal --q-len eight", "argument --q-len: invalid int value: 'eight'"),
    ],
)
def test_malformed_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], args: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["show", STREAMING, *args.split()])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["show", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    options = "--pattern --define --q-len --kv-len --block --batch --head --random-inputs --png"
    for word in [*options.split(), "EMPTY", "PARTIAL", "FULL", "4M"]:
        assert word in out


# ---- given inputs (the API the gallery uses for inputs that must mean something) -----------------------


def test_tile_view_of_given_inputs() -> None:
    kernel = attnc.load(DOCUMENT).document_causal()
    doc = torch.tensor([[0] * 40 + [1] * 24], dtype=torch.int32)
    view = tile_view(kernel, 64, 64, block=(16, 16), inputs={"doc": doc})
    assert view.inputs["doc"] is doc and view.seed is None
    assert torch.equal(view.classes, kernel.block_map(64, 64, block=(16, 16), doc=doc)[0, 0])
    assert view.classes.tolist() == [
        [1, 0, 0, 0],
        [2, 1, 0, 0],
        [1, 1, 1, 0],
        [0, 0, 1, 1],
    ]
    assert "inputs: doc int32[1, 64], given\n" in render(view)


def test_tile_view_takes_a_seed_or_inputs_not_both() -> None:
    kernel = attnc.load(DOCUMENT).document_causal()
    doc = torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(ShowError, match="either random inputs"):
        tile_view(kernel, 8, 8, seed=0, inputs={"doc": doc})
