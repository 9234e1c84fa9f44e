"""attnc's examples, shipped with the package as `attnc.examples`: `.attn` files of published patterns
and small Python scripts that use them (in a checkout they are `examples/`).

    import attnc, attnc.examples
    mod = attnc.load(attnc.examples.path("streaming_llm.attn"))

The scripts run as programs (`python -m attnc.examples.train_sliding_window`); importing this package
imports none of them.
"""

from __future__ import annotations

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
"""The directory that holds the examples."""


def path(name: str) -> Path:
    """The path of an example file by its name (`"streaming_llm.attn"`); a FileNotFoundError naming
    the files there for any other name."""
    found = DIRECTORY / name
    if Path(name).name != name or not found.is_file():
        shown = (p.name for p in DIRECTORY.iterdir() if p.suffix in (".attn", ".py") and p.name[0] != "_")
        names = ", ".join(sorted(shown))
        raise FileNotFoundError(f"no example {name!r} in {DIRECTORY}; examples: {names}")
    return found
