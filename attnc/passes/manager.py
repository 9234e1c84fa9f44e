"""The pass manager: runs a flat list of passes, verifying the IR after each and keeping every stage.

Each pass runs under a node budget (`ir.nodes.node_budget`): passes are linear in the DAG, and one
that would have to build an exponential normal form stops with a `ProgramTooLargeError` at the pattern.

Each stage's text is kept (`stages["canonicalize"]`); `print_between` writes it as it goes
(`attnc ir --print-between-passes`), and `$ATTNC_DUMP_DIR` receives one file per stage.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, TextIO

from attnc.ir.nodes import ModuleIR, node_budget
from attnc.ir.printer import print_module
from attnc.ir.verify import verify

INPUT_STAGE = "input"


@dataclass(frozen=True)
class Compiled:
    """The IR at every stage of a pipeline run, as modules and as text, in pipeline order."""

    modules: dict[str, ModuleIR]
    stages: dict[str, str]

    @property
    def final(self) -> ModuleIR:
        return list(self.modules.values())[-1]


class Pass(Protocol):
    name: ClassVar[str]

    def run(self, module: ModuleIR) -> ModuleIR: ...


@dataclass
class PassManager:
    passes: list[Pass] = field(default_factory=list)
    print_between: TextIO | None = None
    dump_dir: Path | None = field(
        default_factory=lambda: (
            Path(os.environ["ATTNC_DUMP_DIR"]) if os.environ.get("ATTNC_DUMP_DIR") else None
        )
    )

    def add(self, pass_: Pass) -> PassManager:
        self.passes.append(pass_)
        return self

    def _pass_names(self) -> set[str]:
        return {INPUT_STAGE, *(p.name for p in self.passes)}

    def run(self, module: ModuleIR) -> Compiled:
        """Run every pass in order, verifying after each; keep the module and its text at every stage."""
        verify(module, INPUT_STAGE)
        modules = {INPUT_STAGE: module}
        stages = {INPUT_STAGE: print_module(module)}
        self.emit(0, INPUT_STAGE, module.entry.name, stages[INPUT_STAGE])
        for index, pass_ in enumerate(self.passes, start=1):
            with node_budget(module.entry.loc, f"pattern '{module.entry.name}' ({pass_.name})"):
                module = pass_.run(module)
            verify(module, pass_.name)
            modules[pass_.name] = module
            stages[pass_.name] = print_module(module)
            self.emit(index, pass_.name, module.entry.name, stages[pass_.name])
        return Compiled(modules, stages)

    def emit(self, index: int, stage: str, pattern: str, text: str) -> None:
        """Print a stage (`print_between`) and write it to `$ATTNC_DUMP_DIR` (a Triton source as `.py`)."""
        if self.print_between is not None:
            self.print_between.write(f"// ----- IR after {stage} -----\n{text}\n")
        if self.dump_dir is not None:
            folder = self.dump_dir / re.sub(r"[^\w.-]", "_", pattern)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{index:02d}-{stage}{'.ir' if stage in self._pass_names() else '.py'}"
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(target)
