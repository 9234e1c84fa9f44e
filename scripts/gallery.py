"""Regenerate the pattern gallery: docs/gallery/*.png and docs/gallery.md, one entry per pattern of
examples/*.attn — its tile map and mask as `attnc show --png` draws them, its density, its source.

    make gallery                           # or: .venv/bin/python scripts/gallery.py
    .venv/bin/python scripts/gallery.py --check   # exit 1 if docs/gallery.md or a PNG is out of date

Entries without inputs, or shown on `attnc show`'s random inputs, are drawn by running that very
`attnc show` command; entries whose inputs must mean something (BigBird's random table, a MoBA selection,
global tokens, ...) build those inputs here and go through the same functions (`attnc.show.tile_view`,
`save_png`). Each PNG is then reduced to a 32-colour palette to keep it small.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

import attnc
from attnc.cli import main as attnc_main
from attnc.show import render, save_png, tile_view

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
IMAGES = DOCS / "gallery"
MARKDOWN = DOCS / "gallery.md"
PALETTE_COLOURS = 32

Value = int | float | bool
MakeInputs = Callable[[int, int], dict[str, torch.Tensor]]  # (q_len, kv_len) -> input tensors, batch 1


@dataclass(frozen=True)
class Entry:
    """One gallery picture: a pattern of an example file, its parameters, lengths and tile size, and its
    inputs — none, `attnc show`'s random ones (`random_inputs`), or built by `make_inputs`."""

    stem: str
    pattern: str
    params: dict[str, Value] = field(default_factory=dict)
    q_len: int = 1024
    kv_len: int | None = None
    block: int = 64
    random_inputs: bool = False
    make_inputs: MakeInputs | None = None
    note: str = ""

    @property
    def image(self) -> str:
        return f"{self.stem}.{self.pattern}.png"

    def command(self) -> list[str]:
        """The `attnc show` arguments that draw this entry (its inputs aside, when it builds them)."""
        args = [f"examples/{self.stem}.attn", "-p", self.pattern]
        for name, value in self.params.items():
            args += ["-D", f"{name}={str(value).lower() if isinstance(value, bool) else value}"]
        args += ["--q-len", str(self.q_len)]
        if self.kv_len is not None:
            args += ["--kv-len", str(self.kv_len)]
        args += ["--block", f"{self.block},{self.block}"]
        if self.random_inputs:
            args += ["--random-inputs", "0"]
        return args


def example_script(stem: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{stem}", EXAMPLES / f"{stem}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---- inputs that mean something -----------------------------------------------------------------------


def global_tokens(q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    is_global = torch.zeros(1, kv_len, dtype=torch.bool)
    is_global[0, [0, 1, 300, 301, 302, 700]] = True  # e.g. [CLS] and question tokens
    return {"is_global": is_global}


def bigbird_table(q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    return {"random_blocks": example_script("bigbird").random_block_table(-(-q_len // 64), seed=0)}


def random_block_map(q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"blocks": torch.rand(1, 1, -(-q_len // 64), -(-kv_len // 64), generator=generator) < 0.25}


def moba_selection(q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, n, 16, generator=generator) for n in (q_len, kv_len))
    return {"selected": example_script("moba_selection").select_blocks(q, k, block=64, top_k=3)}


def vertical_slash_lines(q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    is_column = torch.zeros(1, 1, kv_len, dtype=torch.bool)
    is_column[..., :4] = True  # the first tokens, as MInference finds
    is_column[..., [130, 131, 400, 777]] = True
    is_diagonal = torch.zeros(1, 1, q_len, dtype=torch.bool)
    is_diagonal[..., :32] = True  # a local band
    is_diagonal[..., [100, 256, 500]] = True
    return {"is_column": is_column, "is_diagonal": is_diagonal}


def document_prefixes(q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    lengths = [200, 90, 310, 150, 274]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(torch.int32)
    starts = torch.repeat_interleave(torch.tensor([0, *lengths[:-1]]).cumsum(0), torch.tensor(lengths))
    return {"doc": doc, "doc_start": starts[None].to(torch.int32)}


def score_tables(q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    return {"bias": torch.zeros(1, 2 * 128 + 1)}


def temperatures(q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    return {"temperature": torch.ones(1)}


SCORE_ONLY = "The score function does not change which tiles run; the map shows the mask."

ENTRIES = [
    Entry("basics", "bidirectional", q_len=512),
    Entry("basics", "gpt_causal", q_len=512),
    Entry("basics", "decode_causal", q_len=256, kv_len=1024),
    Entry("basics", "t5_prefix_lm", {"prefix": 192}),
    Entry("local_windows", "mistral_window", {"window": 256}),
    Entry("local_windows", "flash_local", {"left": 128, "right": 64}),
    Entry("local_windows", "flash_local_bottom_right", {"left": 128, "right": 0}, q_len=256, kv_len=1024),
    Entry("local_windows", "a_shape", {"sinks": 64, "window": 256}),
    Entry("streaming_llm", "streaming_llm", {"window": 256, "sinks": 16}),
    Entry("gemma_local", "gemma_local", {"window": 256}, note=SCORE_ONLY),
    Entry("longformer", "longformer_local", {"w": 128}),
    Entry("longformer", "longformer_dilated", {"w": 32, "dilation": 4}),
    Entry("longformer", "longformer_global", {"w": 64}, make_inputs=global_tokens),
    Entry("sparse_transformer", "sparse_strided", {"l": 128}),
    Entry("sparse_transformer", "sparse_fixed", {"l": 128, "c": 16}),
    Entry("bigbird", "bigbird", {"block": 64}, make_inputs=bigbird_table),
    Entry("dynamic_sparse", "block_sparse", {"block": 64}, make_inputs=random_block_map),
    Entry("dynamic_sparse", "moba", {"block": 64}, make_inputs=moba_selection),
    Entry("dynamic_sparse", "vertical_slash", make_inputs=vertical_slash_lines),
    Entry("document_causal", "document_causal", random_inputs=True),
    Entry("documents", "document_full", random_inputs=True),
    Entry("documents", "document_prefix_lm", {"prefix": 64}, make_inputs=document_prefixes),
    Entry("natten", "na_1d", {"kernel": 127, "dilation": 2}),
    Entry("natten", "nat_2d", {"height": 32, "width": 32, "kernel": 7}),
    Entry("natten", "dinat_2d", {"height": 32, "width": 32, "kernel": 7, "dilation": 4}),
    Entry("natten", "na_3d_video", {"frames": 4, "height": 16, "width": 16, "kernel_t": 3, "kernel": 7}),
    Entry("swin", "swin_window", {"height": 32, "width": 32, "window": 8}),
    Entry("swin", "swin_shifted", {"height": 32, "width": 32, "window": 8, "shift": 4}),
    Entry("sliding_tile", "sta_2d", {"tiles_h": 4, "tiles_w": 4, "tile_h": 8, "tile_w": 8}),
    Entry(
        "sliding_tile",
        "sta_3d",
        {"tiles_t": 4, "tiles_h": 4, "tiles_w": 4, "tile_t": 2, "tile_h": 2, "tile_w": 4},
        block=16,
    ),
    Entry("power_attention", "power_attention", {"block": 16, "window_blocks": 2}, block=16),
    Entry("alibi", "alibi", q_len=512, note=SCORE_ONLY),
    Entry(
        "score_mods",
        "relative_bias",
        {"max_distance": 128},
        q_len=512,
        make_inputs=score_tables,
        note=SCORE_ONLY,
    ),
    Entry("score_mods", "head_temperature", q_len=512, make_inputs=temperatures, note=SCORE_ONLY),
]


# ---- drawing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drawn:
    """What `attnc show` printed for an entry, and the share of (query, key) pairs its mask allows."""

    entry: Entry
    text: str
    allowed: float


def draw(entry: Entry, png: Path | None) -> Drawn:
    """Show the entry (writing its PNG to `png` unless None) and return what it printed."""
    kernel = attnc.load(EXAMPLES / f"{entry.stem}.attn")[entry.pattern](**entry.params)
    kv_len = entry.q_len if entry.kv_len is None else entry.kv_len
    if entry.make_inputs is None:
        args = ["show", *entry.command()] + (["--png", str(png)] if png else [])
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            status = attnc_main(args)
        if status != 0:
            raise SystemExit(f"attnc {' '.join(args)} failed")
        text = output.getvalue().replace(f"wrote {png}\n", "")
        inputs = tile_view(kernel, entry.q_len, kv_len, seed=0).inputs if entry.random_inputs else {}
    else:
        inputs = entry.make_inputs(entry.q_len, kv_len)
        view = tile_view(kernel, entry.q_len, kv_len, block=(entry.block, entry.block), inputs=inputs)
        text = render(view)
        if png:
            save_png(view, png)
    allowed = kernel.mask(entry.q_len, kv_len, batch=1, num_heads=1, **inputs).float().mean().item()
    return Drawn(entry, text, allowed)


def shrink(png: Path) -> None:
    """Re-save a PNG with a small palette (the pictures are a few flat colours and text)."""
    from PIL import Image

    with Image.open(png) as image:
        reduced = image.convert("RGB").quantize(colors=PALETTE_COLOURS)
    reduced.save(png, optimize=True)


# ---- the page -----------------------------------------------------------------------------------------


def pattern_source(stem: str, pattern: str) -> str:
    """The pattern's declaration with the comment above it, after its file's header comment and the
    `fn`s of its file that it calls (blocks of the file are separated by blank lines)."""
    text = (EXAMPLES / f"{stem}.attn").read_text()
    blocks = re.split(r"\n\s*\n", text.strip())
    (own,) = [b for b in blocks if re.search(rf"^pattern {pattern}\b", b, re.M)]
    header = blocks[0]
    is_comment = all(line.startswith("#") for line in header.splitlines())
    used = [header] if is_comment and header != own else []
    for block in blocks:
        declared = re.search(r"^fn (\w+)", block, re.M)
        if declared and re.search(rf"\b{declared.group(1)}\(", own):
            used.append(block)
    return "\n\n".join([*used, own])


def line_starting(text: str, prefix: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(prefix))


def sparsity(text: str) -> str:
    return text.splitlines()[0].split("sparsity ", 1)[1]


def markdown(drawn: list[Drawn]) -> str:
    out = [
        "# Pattern gallery",
        "",
        "<!-- Generated by `make gallery` (scripts/gallery.py) from examples/*.attn; do not edit. -->",
        "",
        "Every pattern of [`examples/`](../examples) as `attnc show --png` draws it. On the left, the tile",
        "map attnc computes before a launch: EMPTY tiles (light) are skipped, PARTIAL tiles (orange) run",
        "with the mask, FULL tiles (blue) run without it. On the right, the dense mask of the same batch row",
        "and head (pairs allowed in blue). *Tiles visited* is the share of tiles the kernel runs, *pairs",
        "allowed* the share of (query, key) pairs the mask allows: the work a kernel does is about the",
        "first, the work a perfect kernel would do the second. Sizes are small so that the pictures stay",
        "readable. The `attnc show` line under each picture redraws it (the committed PNGs are then",
        "reduced to a 32-colour palette); patterns whose inputs must mean something get them from",
        "`scripts/gallery.py`, which says which. [language.md](language.md) explains the language.",
        "",
        "| pattern | file | sizes | sparsity | tiles visited | FULL tiles | pairs allowed |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for d in drawn:
        e = d.entry
        visited, full = re.match(r"density: (\S+) of tiles visited \(PARTIAL or FULL\), (\S+) FULL",
                                 line_starting(d.text, "density:")).groups()  # fmt: skip
        sizes = f"{e.q_len} x {e.kv_len or e.q_len}, tiles {e.block}"
        kind = "metadata" if sparsity(d.text).startswith("metadata") else "analytic"
        out.append(
            f"| [{e.pattern}](#{e.stem}{e.pattern}) | `{e.stem}.attn` | {sizes} | {kind} | {visited} "
            f"| {full} | {100 * d.allowed:.1f}% |"
        )
    for d in drawn:
        e = d.entry
        out += ["", f"## {e.stem}.{e.pattern}", "", "```attn", pattern_source(e.stem, e.pattern), "```", ""]
        if e.make_inputs is None:
            out.append(f"`attnc show {' '.join(e.command())} --png docs/gallery/{e.image}`")
        else:
            out.append(
                f"`attnc show {' '.join(e.command())}` on inputs built by `scripts/gallery.py` "
                f"(`{e.make_inputs.__name__}`)"
            )
        out += ["", f"![{e.pattern}](gallery/{e.image})", ""]
        out.append(f"- {sparsity(d.text)}")
        out.append(f"- {line_starting(d.text, 'tiles:')}")
        out.append(
            f"- {line_starting(d.text, 'density:')}; {100 * d.allowed:.1f}% of (query, key) pairs allowed"
        )
        if e.note:
            out.append(f"- {e.note}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only check that the committed gallery is current"
    )
    args = parser.parse_args(argv)
    if args.check:
        drawn = [draw(e, None) for e in ENTRIES]
        stale = MARKDOWN.read_text() != markdown(drawn) if MARKDOWN.exists() else True
        missing = [e.image for e in ENTRIES if not (IMAGES / e.image).exists()]
        extra = sorted({p.name for p in IMAGES.glob("*.png")} - {e.image for e in ENTRIES})
        for what, bad in (
            ("stale", [str(MARKDOWN)] if stale else []),
            ("missing", missing),
            ("extra", extra),
        ):
            if bad:
                print(f"gallery {what}: {', '.join(bad)}; run `make gallery`", file=sys.stderr)
        return 1 if stale or missing or extra else 0
    IMAGES.mkdir(parents=True, exist_ok=True)
    for old in IMAGES.glob("*.png"):
        old.unlink()
    drawn = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in ENTRIES:
            png = Path(tmp) / entry.image
            drawn.append(draw(entry, png))
            shrink(png)
            (IMAGES / entry.image).write_bytes(png.read_bytes())
            print(f"docs/gallery/{entry.image}: {(IMAGES / entry.image).stat().st_size // 1024} KiB")
    MARKDOWN.write_text(markdown(drawn))
    print(f"wrote {MARKDOWN.relative_to(ROOT)} ({len(drawn)} patterns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
