"""Attention kernels: attnc against compiled FlexAttention and SDPA's best backend, forward and forward +
backward, on ten patterns at 4K-32K tokens, each result checked against a dense reference before it is
timed. The harness is `attnc/bench.py` (its docstring gives the method); this script and `attnc bench`
run it with the same options.

Usage::

    python benchmarks/attention.py --smoke          # tiny sizes on the CPU (Triton's interpreter)
    python benchmarks/attention.py                  # the full sweep, on a GPU
    python benchmarks/attention.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that `python benchmarks/attention.py` finds attnc without installing it
    sys.path.insert(0, str(ROOT))

from attnc.bench import main  # noqa: E402 (after the path is set)

if __name__ == "__main__":
    sys.exit(main())
