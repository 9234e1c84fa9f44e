"""The pass manager: runs a flat list of passes, verifying the IR after each and keeping every stage.

Each pass runs under a node budget (`ir.nodes.node_budget`): passes are linear in the DAG, and one
that would have to build an exponential normal form stops with a `ProgramTooLargeError` at the pattern.
The passes of a run share the normal form's tables (`analysis.normal_form.shared_tables`), so an
expression that several analyses canonicalise is normalised once.

Each stage's module is kept, and its text is printed the first time someone asks for it
(`stages["canonicalize"]`, `kern.ir(stage)`): printing every stage of every build would cost more than
some passes. `print_between` writes each stage as it goes (`attnc ir --print-between-passes`), and
`$ATTNC_DUMP_DIR` receives one file per stage; those print every stage.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, TextIO

from attnc import config
from attnc.analysis.normal_form import shared_tables
from attnc.ir.nodes import ModuleIR, node_budget
from attnc.ir.printer import print_module
from attnc.ir.verify import verify

INPUT_STAGE = "input"


class StageTexts(Mapping[str, str]):
    """The text of each stage's module, by stage name in pipeline order, printed when first read; then
    the stages given as text (`with_text`: the Triton source)."""

    def __init__(self, modules: Mapping[str, ModuleIR], texts: Mapping[str, str] | None = None) -> None:
        self._modules = modules
        self._given = dict(texts or {})
        self._printed: dict[str, str] = {}

    def with_text(self, stage: str, text: str) -> StageTexts:
        """These stages and one more, given as text; what either prints is printed once for both."""
        extended = StageTexts(self._modules, {**self._given, stage: text})
        extended._printed = self._printed
        return extended

    def __getitem__(self, stage: str) -> str:
        if stage in self._given:
            return self._given[stage]
        text = self._printed.get(stage)
        if text is None:
            text = self._printed[stage] = print_module(self._modules[stage])
        return text

    def __iter__(self) -> Iterator[str]:
        yield from self._modules
        yield from (stage for stage in self._given if stage not in self._modules)

    def __len__(self) -> int:
        return len(self._modules.keys() | self._given.keys())


@dataclass(frozen=True)
class Compiled:
    """The IR at every stage of a pipeline run, as modules and (printed on demand) as text, in pipeline
    order, and how long each pass took (its verification included)."""

    modules: dict[str, ModuleIR]
    seconds: dict[str, float] = field(default_factory=dict)
    stages: StageTexts = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", StageTexts(self.modules))  # one per run: each text printed once

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
    dump_dir: Path | None = field(default_factory=config.dump_dir)

    def add(self, pass_: Pass) -> PassManager:
        self.passes.append(pass_)
        return self

    def _pass_names(self) -> set[str]:
        return {INPUT_STAGE, *(p.name for p in self.passes)}

    def run(self, module: ModuleIR) -> Compiled:
        """Run every pass in order, verifying after each; keep the module at every stage."""
        verify(module, INPUT_STAGE)
        compiled = Compiled({INPUT_STAGE: module})
        self._emit_stage(compiled, 0, INPUT_STAGE)
        with shared_tables():
            for index, pass_ in enumerate(self.passes, start=1):
                start = time.perf_counter()
                previous = module
                with node_budget(module.entry.loc, f"pattern '{module.entry.name}' ({pass_.name})"):
                    module = pass_.run(module)
                verify(module, pass_.name, previous)
                compiled.seconds[pass_.name] = time.perf_counter() - start
                compiled.modules[pass_.name] = module
                self._emit_stage(compiled, index, pass_.name)
        return compiled

    def _emit_stage(self, compiled: Compiled, index: int, stage: str) -> None:
        if self.print_between is not None or self.dump_dir is not None:
            self.emit(index, stage, compiled.final.entry.name, compiled.stages[stage])

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
