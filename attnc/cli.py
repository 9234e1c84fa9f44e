"""The `attnc` command line: `check`, `ir`, `opt`, `show`, `run`, `fuzz`, `bench` and `cache`."""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from attnc import config
from attnc.api import AttnModule, Pattern, load
from attnc.compiler import STAGES, IRTextError, compile_pattern, optimize
from attnc.dsl.source import MAX_SOURCE_BYTES, SourceReadError, read_source, size_error
from attnc.errors import AttnError, InternalError, ParameterError
from attnc.runtime import cache
from attnc.runtime.backend import require_triton, triton_version
from attnc.show import ShowError, render, save_png, tile_view
from attnc.version import __version__

# Seeds go to `torch.Generator.manual_seed`, which takes 64 bits; one range for every command.
SEED_LIMIT = 2**63


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


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed is an int from 0 to 2**63 - 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _seconds(text: str, *, zero: bool) -> float:
    # `float` accepts 'nan' and 'inf': a NaN deadline never passes and an infinite one never ends, so
    # a time budget must be a finite number (a long run takes a large one).
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "at least 0" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds {least}, got {text}")
    return value


def _budget_seconds(text: str) -> float:
    return _seconds(text, zero=False)


def _shrink_seconds(text: str) -> float:
    return _seconds(text, zero=True)


def _parse_block(text: str) -> tuple[int, int]:
    try:
        bm, bn = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BM,BN (two ints), got {text!r}") from None
    return bm, bn


def _selected(module: AttnModule, name: str | None) -> list[Pattern]:
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
    else:
        # Without -p a value goes to every pattern that has the parameter: a name none of them has is a
        # typo, not a value to drop.
        known = {p.name for pattern in patterns for p in pattern.params}
        for key in defines:
            if key not in known:
                raise ShowError(
                    f"-D {key}: no pattern of {args.file} has a parameter '{key}'"
                    + (f" (parameters: {', '.join(sorted(known))})" if known else "")
                )
    for pattern in patterns:
        params = {p.name: defines[p.name] for p in pattern.params if p.name in defines}
        # -D specialises: a parameter given a value is static here; the other runtime ones stay symbols
        # (`!name`), shown with their defaults.
        specialize = frozenset(params)
        values = pattern._bind((), params)
        if args.print_between_passes:
            compile_pattern(pattern._module_ir, values, print_between=sys.stdout, specialize=specialize)
            continue
        compiled = compile_pattern(pattern._module_ir, values, specialize=specialize)
        stage = args.after or list(compiled.passes.stages)[-1]
        sys.stdout.write(compiled.stages[stage])
    return 0


def _read_ir(path: str) -> tuple[str, str]:
    """The IR text of a file, or of standard input for `-`, with the name its errors show."""
    if path != "-":
        try:
            return read_source(Path(path)), path
        except SourceReadError as err:
            raise IRTextError(f"{path}: {err.reason}", None) from None
    data = sys.stdin.buffer.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise IRTextError(f"<stdin>: {size_error(MAX_SOURCE_BYTES, 'IR text')}", None)
    try:
        return data.decode("utf-8"), "<stdin>"
    except UnicodeDecodeError:
        raise IRTextError("<stdin>: it is not UTF-8 text", None) from None


def _passes(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


def _cmd_opt(args: argparse.Namespace) -> int:
    text, name = _read_ir(args.file)
    between = sys.stdout if args.print_between_passes else None
    result = optimize(text, args.passes, dict(args.define), print_between=between, filename=name)
    if args.output is not None:
        Path(args.output).write_text(result)
    elif between is None:
        sys.stdout.write(result)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    kernel = load(args.file)[args.pattern](**dict(args.define))
    kv_len = args.q_len if args.kv_len is None else args.kv_len
    view = tile_view(
        kernel,
        args.q_len,
        kv_len,
        block=args.block,
        batch=args.batch,
        head=args.head,
        seed=args.random_inputs,
    )
    sys.stdout.write(render(view))
    if args.png is not None:
        save_png(view, args.png)
        print(f"wrote {args.png}")
    return 0


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        b, h, length, d = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,H,L,D (four ints), got {text!r}") from None
    return b, h, length, d


def _cmd_run(args: argparse.Namespace) -> int:
    require_triton()  # attnc.run imports it: without it, the one-line error saying how to install it
    from attnc.run import run

    kernel = load(args.file)[args.pattern](**dict(args.define))
    report = run(
        kernel,
        args.shape,
        kv_len=args.kv_len,
        kv_heads=args.kv_heads,
        dtype=args.dtype,
        seed=args.seed,
        repeats=args.repeat,
        check=args.check,
        backward=args.backward,
    )
    sys.stdout.write(report.describe())
    return 0 if report.ok else 1


def _default_corpus() -> Path:
    """Where `attnc fuzz` saves a failing case: the test suite's corpus when run in a checkout of
    attnc (or any project with `tests/fuzz_corpus/`), else `fuzz_corpus/` here."""
    corpus = Path("tests/fuzz_corpus")
    return corpus if corpus.is_dir() else Path("fuzz_corpus")


def _cmd_fuzz(args: argparse.Namespace) -> int:
    try:
        from attnc.testing import fuzz
    except ImportError as err:  # Hypothesis is an optional dependency
        raise ShowError(f"attnc fuzz needs Hypothesis ({err}); pip install 'attnc[fuzz]'") from None
    if args.replay:
        return fuzz.replay_command(args.replay)
    if args.pattern and args.pattern_file is None:
        raise ShowError("-p NAME selects patterns of the --pattern FILE: give --pattern too")
    if args.pattern_file is not None:
        module = load(args.pattern_file)  # its diagnostics now, not after the first draw
        for name in args.pattern or ():
            module[name]  # a KeyError naming the file's patterns for an unknown name
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    return fuzz.command(
        args.seconds,
        seed,
        target=args.target,
        file=args.pattern_file,
        patterns=args.pattern,
        grads=args.grads,
        max_len=args.max_len,
        save=Path(args.save) if args.save else _default_corpus(),
        shrink_seconds=args.shrink_seconds,
    )


def _cmd_cache(args: argparse.Namespace) -> int:
    if args.action == "info":
        sys.stdout.write(cache.disk_usage().describe())
        return 0
    removed = cache.clear_disk()
    files, size = sum(removed.files.values()), sum(removed.bytes.values())
    print(f"cleared {removed.directory}: removed {files} files, {size:,} bytes")
    return 0


class _Version(argparse.Action):
    """`attnc --version`: attnc's version and those of torch and Triton it runs with (Triton imported
    only when asked: every other command starts without it)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        import torch

        print(f"attnc {__version__} (torch {torch.__version__}, triton {triton_version()})")
        parser.exit()


def _add_defines(
    parser: argparse.ArgumentParser, help: str = "a parameter value (repeatable); others take their defaults"
) -> None:
    parser.add_argument(
        "-D", "--define", action="append", type=_parse_define, default=[], metavar="NAME=VALUE", help=help
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnc", description="A compiler for attention patterns.")
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="print the versions of attnc, torch and Triton, and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="parse and type-check .attn files; print diagnostics")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(run=_cmd_check)

    ir = commands.add_parser("ir", help="print a pattern's IR after a pass, or between all passes")
    ir.add_argument("file", metavar="FILE")
    ir.add_argument("-p", "--pattern", help="the pattern (default: every pattern of the file)")
    _add_defines(ir)
    when = ir.add_mutually_exclusive_group()
    when.add_argument(
        "--after",
        choices=STAGES,
        help="the stage to print (default: the last pass; lower-triton prints the Triton source)",
    )
    when.add_argument("--print-between-passes", action="store_true", help="print the IR after every pass")
    ir.set_defaults(run=_cmd_ir)

    opt = commands.add_parser(
        "opt",
        help="run passes on IR text (as `attnc ir` prints it) and print the result",
        description="Read IR text from FILE (`-`: standard input), run the passes named by --passes in "
        "that order, verifying the IR before and after each, and print the resulting IR (after "
        "lower-triton, which may come last: the Triton source). A pass whose input lacks what it "
        "requires is an error naming the pass that provides it.",
    )
    opt.add_argument("file", metavar="FILE", help="the IR text, or - for standard input")
    opt.add_argument(
        "--passes",
        type=_passes,
        required=True,
        metavar="P1,P2,...",
        help=f"the passes to run, in order: any of {', '.join(STAGES[1:])}",
    )
    _add_defines(
        opt,
        help="a parameter value for bind-params (repeatable), specialising the parameter; static "
        "parameters not given take their defaults",
    )
    opt.add_argument("--print-between-passes", action="store_true", help="print the IR after every pass")
    opt.add_argument("-o", "--output", metavar="OUT", help="write the result to OUT instead of printing it")
    opt.set_defaults(run=_cmd_opt)

    show = commands.add_parser(
        "show",
        help="print a pattern's tile map (EMPTY / PARTIAL / FULL tiles); optionally a PNG with the mask",
        description="Print the exact tile map of one batch row and head: '.' EMPTY tiles (skipped), '+' "
        "PARTIAL (computed with the mask), '#' FULL (computed without it); rows are query tiles, columns "
        "key tiles. Maps over 64 tiles a side are shown in groups of tiles. The header gives the "
        "sparsity the compiler chose and whether a launch needs metadata tensors; below the map come the "
        "tile counts, the density, and the tiles the launch plan cannot classify exactly.",
    )
    show.add_argument("file", metavar="FILE", help="the .attn file")
    show.add_argument("-p", "--pattern", required=True, help="the pattern to show")
    _add_defines(show)
    show.add_argument("--q-len", type=int, required=True, metavar="N", help="number of queries")
    show.add_argument("--kv-len", type=int, metavar="M", help="number of keys (default: N)")
    show.add_argument(
        "--block",
        type=_parse_block,
        default=(128, 128),
        metavar="BM,BN",
        help="tile size: queries x keys, each side at most 4096 (default: 128,128)",
    )
    show.add_argument(
        "--batch",
        type=int,
        default=0,
        metavar="B",
        help="the batch row to show (default: 0); the pattern sees BATCH = B + 1",
    )
    show.add_argument(
        "--head",
        type=int,
        default=0,
        metavar="H",
        help="the head to show (default: 0); the pattern sees NUM_HEADS = H + 1",
    )
    show.add_argument(
        "--random-inputs",
        type=_seed,
        metavar="SEED",
        help="show a pattern with input tensors on random ones: sorted document ids for int inputs, "
        "coin flips for bool inputs, standard normal floats",
    )
    show.add_argument(
        "--png",
        metavar="OUT",
        help="also write a PNG: the tile map and, up to 4M mask elements, the dense mask (needs matplotlib)",
    )
    show.set_defaults(run=_cmd_show)

    run = commands.add_parser(
        "run",
        help="run a pattern's kernel on random inputs: check it against the oracle, time it, name the "
        "backend",
        description="Compile the pattern, run its fused kernel on random q, k, v (and random input tensors: "
        "sorted document ids for int inputs, coin flips for bools), compare output and lse with the float64 "
        "oracle by the tolerance rule (exit 1 on a mismatch), and time repeated calls. Runs on the GPU, or "
        "under Triton's interpreter when the process has none (then the time is no speed figure).",
    )
    run.add_argument("file", metavar="FILE", help="the .attn file")
    run.add_argument("-p", "--pattern", required=True, help="the pattern to run")
    _add_defines(run)
    run.add_argument(
        "--shape",
        type=_parse_shape,
        metavar="B,H,L,D",
        help="batch, query heads, query length, head dim (default 1,2,256,64 on the interpreter, "
        "2,16,4096,128 on a GPU)",
    )
    run.add_argument("--kv-len", type=int, metavar="M", help="number of keys (default: L)")
    run.add_argument("--kv-heads", type=int, metavar="HKV", help="key/value heads, dividing H (default: H)")
    run.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    run.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs (default 0)")
    run.add_argument("--repeat", type=int, default=5, metavar="N", help="timed calls (default 5)")
    run.add_argument("--no-check", dest="check", action="store_false", help="skip the oracle comparison")
    run.add_argument(
        "--backward",
        action="store_true",
        help="also differentiate: dq, dk, dv and the gradients of the score's float inputs against autograd "
        "through the oracle, and forward + backward timed",
    )
    run.set_defaults(run=_cmd_run)

    fuzz = commands.add_parser(
        "fuzz",
        help="differential fuzzing: random programs (or your file's patterns) and shapes, kernels vs the "
        "dense oracle, and the front end on mutated source",
    )
    fuzz.add_argument(
        "--seconds",
        type=_budget_seconds,
        default=60.0,
        metavar="N",
        help="time budget, finite and positive (default 60)",
    )
    fuzz.add_argument("--seed", type=_seed, metavar="S", help="seed of the run (default: random, printed)")
    fuzz.add_argument(
        "--pattern",
        dest="pattern_file",
        metavar="FILE",
        help="fuzz the patterns of this .attn file over random shapes, parameters and inputs",
    )
    fuzz.add_argument(
        "-p", dest="pattern", action="append", metavar="NAME", help="with --pattern: only this pattern"
    )
    fuzz.add_argument(
        "--target",
        choices=["all", "kernels", "frontend"],
        default="all",
        help="what to fuzz (default all: kernels, then the front end for 15%% of the time)",
    )
    fuzz.add_argument("--no-grad", dest="grads", action="store_false", help="check forward kernels only")
    fuzz.add_argument(
        "--max-len", type=_positive_int, default=80, metavar="N", help="longest sequence (default 80)"
    )
    fuzz.add_argument(
        "--save",
        metavar="DIR",
        help="where to write the minimal failing case, as a .attn file (default: tests/fuzz_corpus/ if "
        "it exists, else fuzz_corpus/)",
    )
    fuzz.add_argument(
        "--shrink-seconds",
        type=_shrink_seconds,
        default=120.0,
        metavar="N",
        help="how long to shrink a failure (default 120)",
    )
    fuzz.add_argument("--replay", nargs="+", metavar="FILE", help="run saved cases again instead")
    fuzz.set_defaults(run=_cmd_fuzz)

    cache_parser = commands.add_parser(
        "cache",
        help="show (info) or empty (clear) the kernel cache directory",
        description="info: the cache directory (ATTNC_CACHE_DIR, else $XDG_CACHE_HOME/attnc, else "
        "~/.cache/attnc) and the files and bytes of its kernels/ and autotune/ directories. clear: delete "
        "those files (never anything else in the directory); later runs render and tune again.",
    )
    cache_parser.add_argument("action", choices=["info", "clear"])
    cache_parser.set_defaults(run=_cmd_cache)

    from attnc.bench import configure_parser as configure_bench

    configure_bench(
        commands.add_parser(
            "bench",
            help="time the kernels against FlexAttention and SDPA, each checked first (a GPU; --smoke: CPU)",
        )
    )
    return parser


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


def _os_message(err: OSError) -> str:
    """`FILE: REASON` for an error of the operating system (`args[0]` is only the errno), and the
    environment variable that chose the path when one did."""
    reason = err.strerror or _first_line(err)
    if err.filename is None:
        return reason
    names = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else str(err.filename)
    message = f"{names}: {reason}"
    for variable, root in config.path_variables().items():
        if Path(os.fsdecode(err.filename)).is_relative_to(root):
            message += f" (under {variable}={root})"
            break
    return message


def _memory_message(err: BaseException) -> str | None:
    """A one-line reason for an allocation failure (torch's CPU or CUDA allocator, or Python's), or None
    for any other error."""
    text = str(err)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return f"out of memory: {_first_line(err)}" if text else "out of memory"
    asked = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if asked:
        return f"out of memory: could not allocate {int(asked[1]):,} bytes; try smaller sizes"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user's mistake — in the program, an option, a file, the environment — is
    reported as one line (a diagnostic with its excerpt for `.attn` errors) with exit status 1, never
    a traceback; a broken invariant of attnc itself (`InternalError`, `AssertionError`) keeps its
    traceback, to be reported."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except AttnError as err:
        # An error without a place in a source (an environment variable, the cache) reads as the CLI's own.
        print(err if err.loc is not None else f"attnc: error: {err.reason}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # piped into a reader that stopped (`attnc ir ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (InternalError, AssertionError):
        traceback.print_exc()
        print(
            "attnc: internal error: a bug in attnc; please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
    except KeyError as err:  # an unknown pattern name: the message is the key
        message = err.args[0] if err.args else str(err)
        print(f"attnc: error: {message}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"attnc: error: {_os_message(err)}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, ArithmeticError, MemoryError) as err:
        # ShowError and the settings' own ValueErrors, allocation failures, and what torch, Triton and
        # Hypothesis raise on values they refuse: the reason in one line.
        print(f"attnc: error: {_memory_message(err) or _first_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the user's own stop, not a failure to explain
        print("attnc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
