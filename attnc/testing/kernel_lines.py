"""The size of the generated kernels: the lines of the forward and backward source that `lower-triton`
renders for every stdlib pattern, example and fuzz-corpus kernel (issue 18 item 1: forward <= 350,
backward <= 700). Rendering only: nothing is parsed or compiled, so the whole corpus takes seconds.

Used by `tests/test_generated_source.py` (the bound) and from the command line:
`python -m attnc.testing.kernel_lines [-v]` prints each kernel's lines and the largest.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import attnc
import attnc.examples
from attnc.codegen.lower import build_backward_spec, build_spec, render
from attnc.runtime.launch import BACKWARD_TEMPLATE
from attnc.testing.fuzz import read_case

FORWARD_LINES, BACKWARD_LINES = 350, 700

# The stdlib patterns' parameters where they have no defaults: two sets, as the structure of a kernel
# can depend on a static value (neighbourhood kernels: a dilation, the kernel size against the width).
STDLIB_PARAMS: tuple[dict[str, dict[str, int]], ...] = (
    {
        "sliding_window": {"window": 3},
        "local": {"left": 2, "right": 1},
        "sinks": {"count": 2},
        "prefix_lm": {"prefix": 3},
        "dilated": {"window": 2, "dilation": 2},
        "neighborhood_1d": {"kernel": 3, "dilation": 2},
        "neighborhood_2d": {"height": 3, "width": 4, "kernel_h": 3, "kernel_w": 3},
        "neighborhood_3d": {"depth": 2, "height": 2, "width": 3, "kernel_d": 1, "kernel_h": 1, "kernel_w": 3},
    },
    {
        "sliding_window": {"window": 1024},
        "local": {"left": 256, "right": 256},
        "sinks": {"count": 4},
        "prefix_lm": {"prefix": 512},
        "dilated": {"window": 256, "dilation": 4},
        "neighborhood_1d": {"kernel": 7},
        "neighborhood_2d": {"height": 32, "width": 32, "kernel_h": 7, "kernel_w": 7},
        "neighborhood_3d": {"depth": 8, "height": 8, "width": 8, "kernel_d": 3, "kernel_h": 3, "kernel_w": 3},
    },
)

# The fuzz corpus of a checkout (`tests/fuzz_corpus`), where there is one.
FUZZ_CORPUS = Path(__file__).resolve().parents[2] / "tests" / "fuzz_corpus"


def kernels() -> Iterator[tuple[str, attnc.Kernel]]:
    """Every stdlib pattern (at each parameter set), every pattern of the examples (at its defaults) and
    every kernel case of the fuzz corpus, by name."""
    stdlib = attnc.stdlib()
    for i, params in enumerate(STDLIB_PARAMS):
        for name in stdlib.patterns:
            if i == 0 or name in params:
                yield (
                    f"stdlib.{name}" + ("" if i == 0 else f" {params[name]}"),
                    stdlib[name](**params.get(name, {})),
                )
    for path in sorted(attnc.examples.DIRECTORY.glob("*.attn")):
        module = attnc.load(path)
        for name in module.own_patterns:
            yield f"{path.stem}.{name}", module[name]()
    for path in sorted(FUZZ_CORPUS.glob("*.attn")) if FUZZ_CORPUS.is_dir() else ():
        case = read_case(path)
        if case.kind == "kernel" and case.source is not None:
            yield path.stem, attnc.loads(case.source, str(path))[case.pattern](**case.params)


def lines(kern: attnc.Kernel) -> tuple[int, int]:
    """The lines of a kernel's forward and backward source."""
    forward = render(build_spec(kern.pattern))
    backward = render(build_backward_spec(kern.pattern), BACKWARD_TEMPLATE)
    return forward.count("\n"), backward.count("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attnc.testing.kernel_lines", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="every kernel's lines")
    args = parser.parse_args(argv)
    counts = [(name, *lines(kern)) for name, kern in kernels()]
    if args.verbose:
        for name, forward, backward in counts:
            print(f"{name:60} {forward:5} {backward:5}")
    print(
        f"{len(counts)} kernels; forward: largest {max(c[1] for c in counts)}, "
        f"{sum(c[1] > FORWARD_LINES for c in counts)} over {FORWARD_LINES}; backward: largest "
        f"{max(c[2] for c in counts)}, {sum(c[2] > BACKWARD_LINES for c in counts)} over {BACKWARD_LINES}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
