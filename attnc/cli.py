"""The `attnc` command line: `check` and `ir` (more commands arrive with the kernels)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from attnc.api import Module, Pattern, load
from attnc.compiler import compile_pattern
from attnc.errors import AttnError, ParameterError
from attnc.passes import PASSES
from attnc.passes.manager import INPUT_STAGE

STAGES = [INPUT_STAGE, *PASSES]


def _parse_define(text: str) -> tuple[str, int | float | bool]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, raw = text.split("=", 1)
    value: int | float | bool
    if raw in ("true", "false"):
        value = raw == "true"
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{name}: expected a number, true or false, got {raw!r}"
                ) from None
    return name.strip(), value


def _selected(module: Module, name: str | None) -> list[Pattern]:
    if name is not None:
        return [module[name]]
    return [module[n] for n in module.own_patterns]


def _cmd_check(args: argparse.Namespace) -> int:
    for path in args.files:
        module = load(path)
        for pattern in _selected(module, None):
            # Inline every pattern too: a clash between inputs of referenced patterns shows up there.
            from attnc.passes import Inline

            Inline().run(pattern._module_ir)
        names = ", ".join(module.own_patterns) or "no patterns"
        print(f"{path}: ok ({names})")
    return 0


def _cmd_ir(args: argparse.Namespace) -> int:
    module = load(args.file)
    defines = dict(args.define)
    patterns = _selected(module, args.pattern)
    if args.pattern is not None:
        known = {p.name for p in patterns[0].params}
        for key in defines:
            if key not in known:
                raise ParameterError(
                    f"pattern '{args.pattern}' has no parameter '{key}'", patterns[0]._module_ir.entry.loc
                )
    for pattern in patterns:
        params = {p.name: defines[p.name] for p in pattern.params if p.name in defines}
        values = pattern._bind((), params)
        if args.print_between_passes:
            compile_pattern(pattern._module_ir, values, print_between=sys.stdout)
            continue
        compiled = compile_pattern(pattern._module_ir, values)
        stage = args.after or list(compiled.stages)[-1]
        sys.stdout.write(compiled.stages[stage])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnc", description="A compiler for attention patterns.")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="parse and type-check .attn files; print diagnostics")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(run=_cmd_check)

    ir = commands.add_parser("ir", help="print a pattern's IR after a pass, or between all passes")
    ir.add_argument("file", metavar="FILE")
    ir.add_argument("-p", "--pattern", help="the pattern (default: every pattern of the file)")
    ir.add_argument(
        "-D",
        "--define",
        action="append",
        type=_parse_define,
        default=[],
        metavar="NAME=VALUE",
        help="a parameter value (repeatable); others take their defaults",
    )
    when = ir.add_mutually_exclusive_group()
    when.add_argument("--after", choices=STAGES, help="the stage to print (default: the last)")
    when.add_argument("--print-between-passes", action="store_true", help="print the IR after every pass")
    ir.set_defaults(run=_cmd_ir)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except AttnError as err:
        print(err, file=sys.stderr)
        return 1
    except (FileNotFoundError, KeyError) as err:
        message = err.args[0] if err.args else str(err)
        print(f"attnc: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
