"""`lower-triton`: a fused pattern to its `KernelSpec`, and the spec rendered into Triton source.

The last stage of the pipeline. `build_spec` reads what the earlier passes decided — the kernel values
and hoisted lets of `fuse`, the sparsity of `block-sparsify`, the closed-form ranges of
`derive-ranges` — and turns every expression into Triton statements (`emit.py`). `render` places the
spec in the Jinja templates (`templates/*.py.jinja`, `StrictUndefined`: a name the template uses and
the spec lacks is an error, never an empty string) and parses the result with Python's parser before
Triton ever sees it.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import jinja2

from attnc.codegen.emit import INT32, INT64, Assign, Emitter, float64_nodes, input_arg
from attnc.codegen.spec import Body, InputArg, KernelSpec, KeyRange
from attnc.errors import InternalError
from attnc.ir.nodes import Node, Op, PatternIR, format_const
from attnc.passes.value_ranges import fits_int32

TEMPLATES = Path(__file__).parent / "templates"

# What the names of the IR are called in the kernel (see the templates' header comments).
KERNEL_NAMES = {
    "q": "q_idx",
    "kv": "kv_idx",
    "b": "b_idx",
    "h": "h_idx",
    "q_first": "q_first",
    "q_last": "q_last",
    "BATCH": "BATCH",
    "NUM_HEADS": "NUM_HEADS",
    "Q_LEN": "Q_LEN",
    "KV_LEN": "KV_LEN",
    "s": "s",
}


def _scalar(emitter: Emitter, node: Node) -> str:
    """A prologue value that must be a tensor (constants become typed scalars)."""
    if node.op is Op.CONST:
        dtype = INT32 if fits_int32((int(node.attr), int(node.attr))) else INT64  # type: ignore[arg-type]
        return f"tl.full([], {int(node.attr)}, {dtype})"  # type: ignore[arg-type]
    return emitter.value(node)


def _title(pattern: PatternIR) -> str:
    bindings = ", ".join(f"{n}={format_const(v)}" for n, v in pattern.bindings or ())
    return f"{pattern.name}({bindings})"


def build_spec(pattern: PatternIR) -> KernelSpec:
    """The forward kernel's spec of a pattern compiled through `fuse`."""
    if pattern.sparsity is None:
        raise InternalError("lower-triton runs after block-sparsify and fuse")
    lets = dict(pattern.lets)
    kernel_mask = pattern.derived_value("kernel_mask")
    kernel_score = pattern.derived_value("kernel_score")
    if (pattern.mask is not None and kernel_mask is None and not pattern.mask.is_const) or (
        pattern.score is not None and kernel_score is None and pattern.score.op is not Op.SCORE
    ):
        raise InternalError("lower-triton runs after fuse")
    float64 = float64_nodes([kernel_mask] if kernel_mask is not None else [], lets)

    prologue = Emitter(pattern, KERNEL_NAMES, float64, prefix="p")
    for name, value in pattern.lets:
        prologue.lines.append(Assign(name, prologue.value(value)))
    kv_ranges = None
    if pattern.sparsity == "analytic":
        count = pattern.derived_value("range_count")
        assert count is not None
        ranges = []
        for j in range(int(count.attr)):  # type: ignore[arg-type]
            values = []
            for part in ("lo", "hi", "full_lo", "full_hi"):
                node = pattern.derived_value(f"kv_{part}_{j}")
                assert node is not None
                prologue.lines.append(Assign(f"kv_{part}_{j}", _scalar(prologue, node)))
                values.append(f"kv_{part}_{j}")
            ranges.append(KeyRange(*values))
        kv_ranges = tuple(ranges)

    def body(with_mask: bool) -> tuple[Body, set[str]]:
        emitter = Emitter(
            pattern, KERNEL_NAMES, float64, known=prologue.names, prefix="m" if with_mask else "f"
        )
        score = emitter.cast(kernel_score, "tl.float32") if kernel_score is not None else None
        mask = emitter.value(kernel_mask) if with_mask and kernel_mask is not None else None
        return Body(tuple(emitter.lines), score, mask), emitter.helpers

    masked, masked_helpers = body(with_mask=True)
    full, full_helpers = body(with_mask=False)
    helpers = prologue.helpers | masked_helpers | full_helpers
    inputs = tuple(InputArg(d.name, input_arg(d.name), d.dtype, len(d.dims)) for d in pattern.inputs)
    sparsity = pattern.sparsity
    return KernelSpec(
        pattern=_title(pattern),
        inputs=inputs,
        prologue=tuple(prologue.lines),
        kv_ranges=kv_ranges,
        metadata_b=sparsity.startswith("metadata") and "b" in sparsity.removeprefix("metadata"),
        metadata_h=sparsity.startswith("metadata") and "h" in sparsity.removeprefix("metadata"),
        masked=masked,
        full=full,
        helpers=tuple(sorted(helpers)),
    )


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        extensions=["jinja2.ext.do"],
    )


def render(spec: KernelSpec, template: str = "attention_fwd.py.jinja") -> str:
    """The Triton source of a spec; raises InternalError (with the numbered source) if it does not
    parse as Python."""
    source = _environment().get_template(template).render(spec=spec)
    try:
        ast.parse(source)
    except SyntaxError as err:
        numbered = "\n".join(f"{i:4} {line}" for i, line in enumerate(source.splitlines(), start=1))
        raise InternalError(
            f"rendered {template} does not parse: {err.msg} at line {err.lineno}\n{numbered}"
        ) from None
    return source
