"""Compile time is linear in the DAG: programs whose expression DAG is small but whose tree is huge
compile in moments, and one whose analysis must genuinely expand stops with a located error.

The IR is hash-consed (`attnc/ir/nodes.py`): structurally equal nodes are one object, so equality and
hashing are O(1), and every pass memoises per node. Each compile below runs under an alarm, so a
regression to tree-sized work fails the test instead of hanging the suite.
"""

from __future__ import annotations

import gc
import pickle
import signal
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

import attnc
from attnc.errors import Loc, ProgramTooLargeError, SourceFile
from attnc.ir import nodes
from attnc.ir.nodes import Node, Op, const, make, var
from attnc.testing import compare

BOUND_S = 5.0
"""Each program below compiles in well under a second on a quiet machine; before hash-consing each took
from 16 s to hours. The bound leaves room for a loaded CI machine."""
ALARM_S = 60


@contextmanager
def deadline(seconds: int = ALARM_S) -> Iterator[None]:
    """Fail (instead of hanging) if the block runs longer than `seconds`."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: compile time is not linear in the DAG")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def timed(action: Callable[[], object]) -> tuple[object, float]:
    with deadline():
        start = time.perf_counter()
        result = action()
        return result, time.perf_counter() - start


def _lets(first: str, step: str, count: int, mask: str) -> str:
    lines = [f"  let a0 = {first}"] + [f"  let a{i + 1} = {step.format(p=f'a{i}')}" for i in range(count)]
    return "pattern p {\n" + "\n".join(lines) + f"\n  mask = {mask.format(last=f'a{count}')}\n}}\n"


def _nested(start: str, step: str, depth: int) -> str:
    text = start
    for i in range(depth):
        text = step.format(e=text, i=i + 2)
    return text


def _fns(first: str, step: str, count: int, mask: str) -> str:
    fns = [f"fn f0(x: int) = {first}"] + [
        f"fn f{i + 1}(x: int) = {step.format(f=f'f{i}')}" for i in range(count)
    ]
    return "\n".join(fns) + f"\npattern p {{ mask = {mask.format(f=f'f{count}')} }}\n"


# Each blows up as a tree: sizes from the reliability probe (finding 8) and issue 16.
BLOW_UPS = {
    "lets squaring modulo a prime, 4 deep": _lets("q - kv", "{p} * {p} % 1000003", 4, "{last} >= 0"),
    "lets squaring modulo a prime, 60 deep": _lets("q - kv", "{p} * {p} % 1000003", 60, "{last} >= 0"),
    "lets doubling, 20 deep": _lets("q - kv", "{p} + {p}", 20, "{last} >= 0"),
    "nested sums modulo, 8 deep": f"pattern p {{ mask = {_nested('q', '({e} + kv) % {i}', 8)} == 0 }}\n",
    "nested abs, 14 deep": f"pattern p {{ mask = {_nested('q - kv', 'abs({e}) - 1', 14)} <= 3 }}\n",
    "fn calling the previous twice, 14 deep": _fns("x - kv", "{f}(x) + {f}(x + 1)", 14, "{f}(q) >= 0"),
    "fn chain using its argument twice, 40 deep": _fns(
        "x - kv", "{f}(x) * {f}(x) % 1000003", 40, "{f}(q) >= 0"
    ),
    # Each fn's body is expanded once per distinct call: expanding it once in terms of its parameter
    # and substituting into that per link rebuilt the chain below every link (about 170,000 nodes).
    "fn chain using its argument three times, 400 deep": _fns(
        "x - kv", "({f}(x) + {f}(x) * {f}(x)) % 97", 400, "{f}(q) >= 3"
    ),
    # Likewise each referenced pattern's mask once per distinct reference, lets put in as it is walked
    # (expanding once per pattern and substituting per reference built 104,003 nodes at 320 links for a
    # DAG of 649, and stopped at the budget).
    "pattern referring to the previous twice, 320 deep": "\n".join(
        ["pattern p0(w: int) { let d = q - kv\n mask = d < w }"]
        + [f"pattern p{i + 1}(w: int) {{ mask = p{i}(w) or (p{i}(w) and kv % 3 == 0) }}" for i in range(320)]
        + ["pattern p(w: int = 5) { mask = p320(w) }\n"]
    ),
    "300 nested tanh in the score": f"pattern p {{ score = {_nested('s', 'tanh({e})', 300)} }}\n",
}


@pytest.mark.parametrize("source", BLOW_UPS.values(), ids=list(BLOW_UPS))
def test_program_with_a_small_dag_and_a_huge_tree_compiles_quickly(source: str) -> None:
    module = attnc.loads(source)
    kernel, seconds = timed(lambda: module.p())
    assert isinstance(kernel, attnc.Kernel)
    assert "def attnc_fwd" in kernel.stages["lower-triton"]
    assert seconds < BOUND_S, f"compiling took {seconds:.1f} s"


# Squares without a modulus leave int64 long before the last: the overflow check must say so promptly.
OVERFLOWING = {
    "60 lets each squaring the last": _lets("q - kv", "{p} * {p}", 60, "{last} >= 0"),
    "40 fns each squaring the previous": _fns("x - kv", "{f}(x) * {f}(x)", 40, "{f}(q) >= 0"),
}


@pytest.mark.parametrize("source", OVERFLOWING.values(), ids=list(OVERFLOWING))
def test_squaring_chain_that_leaves_int64_gets_a_located_error_quickly(source: str) -> None:
    module = attnc.loads(source)

    def compile_() -> attnc.AttnError:
        with pytest.raises(attnc.AttnError) as info:
            module.p()
        return info.value

    error, seconds = timed(compile_)
    assert isinstance(error, attnc.AttnError) and error.loc is not None
    assert "overflow" in error.reason
    assert seconds < BOUND_S, f"reporting took {seconds:.1f} s"


def test_oracle_evaluates_a_doubling_chain_once_per_node() -> None:
    module = attnc.loads(_lets("q - kv", "{p} + {p}", 20, "{last} >= 0"))
    mask, seconds = timed(lambda: module.p().mask(6, 6))
    causal = attnc.stdlib().causal().mask(6, 6)
    assert bool((mask == causal).all())
    assert seconds < BOUND_S


def test_kernel_of_a_squaring_chain_matches_the_oracle() -> None:
    module = attnc.loads(_lets("q - kv", "{p} * {p} % 1000003", 4, "{last} % 3 == 0"))
    kernel, _ = timed(lambda: module.p())
    q, k, v = (torch.randn(1, 1, 40, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out, lse = kernel(q, k, v, return_lse=True)  # type: ignore[operator]
    assert compare(kernel, out, lse, q, k, v).ok  # type: ignore[arg-type]


def test_expression_whose_normal_form_is_exponential_is_a_located_error(monkeypatch) -> None:
    # Distributing each `min` of a sum into and/or doubles the comparison: 2**24 of them. A smaller
    # budget than the default keeps the test fast; the default is reached the same way.
    monkeypatch.setattr(nodes, "NODE_BUDGET", 20_000)
    terms = " + ".join(f"min(q + {i}, kv * {i + 2})" for i in range(24))
    module = attnc.loads(f"pattern p {{\n  mask = {terms} <= 100\n}}\n", "sum_of_mins.attn")

    def compile_() -> ProgramTooLargeError:
        with pytest.raises(ProgramTooLargeError) as info:
            module.p()
        return info.value

    error, seconds = timed(compile_)
    assert isinstance(error, ProgramTooLargeError)
    assert error.loc is not None and (error.loc.file.name, error.loc.line) == ("sum_of_mins.attn", 1)
    assert "pattern 'p'" in error.reason and "too large" in error.reason
    assert "\n" not in error.reason
    assert seconds < BOUND_S


def test_budget_is_far_above_what_real_patterns_build(monkeypatch) -> None:
    monkeypatch.setattr(nodes, "NODE_BUDGET", nodes.NODE_BUDGET // 20)
    assert isinstance(attnc.stdlib().neighborhood_3d(8, 8, 8, 3, 3, 3), attnc.Kernel)
    natten = attnc.load("examples/natten.attn")
    assert isinstance(natten.na_1d(), attnc.Kernel)


# ---- hash-consing ------------------------------------------------------------------------------------


def _doubling(depth: int, loc: Loc | None = None) -> Node:
    """(q - kv) added to itself `depth` times: a DAG of depth + 3 nodes, a tree of 2**depth leaves."""
    node = make(Op.SUB, var("q", loc), var("kv", loc), loc=loc)
    for _ in range(depth):
        node = make(Op.ADD, node, node, loc=loc)
    return node


def test_equal_expressions_built_separately_are_one_object() -> None:
    assert make(Op.SUB, var("q"), const(3)) is make(Op.SUB, var("q"), const(3))
    same = _doubling(200) is _doubling(200)
    assert same


def test_equality_and_hash_do_not_walk_the_tree() -> None:
    # 2**200 leaves: any structural comparison would never finish.
    here = Loc(SourceFile("x.attn", "q - kv"), 1, 1)
    located = _doubling(200, here)
    plain = _doubling(200)
    (equal, same_hash, differ), seconds = timed(
        lambda: (located == plain, hash(located) == hash(plain), located == _doubling(199))
    )
    assert equal and same_hash and not differ
    assert seconds < 1.0


def test_repr_of_a_huge_tree_is_short() -> None:
    text, seconds = timed(lambda: repr(_doubling(200)))
    assert len(text) <= 2000 and text.startswith("Node(op=<Op.ADD: 'add'>")  # type: ignore[union-attr]
    assert seconds < 1.0


def test_constants_of_different_types_or_bits_are_different_nodes() -> None:
    assert const(1) is not const(1.0) and const(1) is not const(True)
    assert const(0.0) != const(-0.0)
    assert const(float("nan")) is const(float("nan"))


def test_located_node_keeps_its_location_and_equals_its_interned_twin() -> None:
    here = Loc(SourceFile("x.attn", "q - kv"), 1, 1)
    located = make(Op.SUB, var("q", here), var("kv"), loc=here)
    plain = make(Op.SUB, var("q"), var("kv"))
    assert located.loc == here and plain.loc is None
    assert located == plain and hash(located) == hash(plain) and located.canonical is plain
    assert {located: 1}[plain] == 1


def test_error_points_at_this_program_while_another_holds_the_same_expression() -> None:
    # The first program stays alive with the same sub-expression at another place: interning by
    # structure alone would hand the second program the first one's location.
    first = attnc.loads("pattern a {\n  mask = kv <= q + (9223372036854775807 + 1)\n}\n", "first.attn")
    with pytest.raises(attnc.AttnError) as info_first:
        first.a()
    second = attnc.loads(
        "pattern other {\n\n\n  mask = kv <= q + (9223372036854775807 + 1)\n}\n", "second.attn"
    )
    with pytest.raises(attnc.AttnError) as info:
        second.other()
    assert info_first.value.loc is not None and info_first.value.loc.file.name == "first.attn"
    assert info.value.loc is not None
    assert (info.value.loc.file.name, info.value.loc.line) == ("second.attn", 4)


def test_rewritten_node_is_the_interned_one() -> None:
    node = make(Op.ADD, var("q"), const(1))
    assert node.with_args((var("q"), const(1))) is node
    assert node.with_args((var("kv"), const(1))) is make(Op.ADD, var("kv"), const(1))


def test_pickled_node_loads_as_the_live_interned_node() -> None:
    node = _doubling(100)
    loaded, _ = timed(lambda: pickle.loads(pickle.dumps(node)))
    same = loaded is node
    assert same


def test_kernel_survives_pickling() -> None:
    kernel = attnc.stdlib().sliding_window(window=16)
    again = pickle.loads(pickle.dumps(kernel))
    assert bool((again.mask(20, 20) == kernel.mask(20, 20)).all())


def test_unused_nodes_leave_the_intern_table() -> None:
    node = make(Op.MUL, var("q"), const(987_654_321_123))
    ref = weakref.ref(node)
    size = len(nodes._TABLE)
    del node
    gc.collect()
    assert ref() is None
    assert len(nodes._TABLE) < size
