"""What keeps a kernel build fast (issue 16, "Measure"): stage texts printed on demand, the normal form's
tables shared by the passes of a compilation, verification once per interned node, the rendered
kernel's check and the cache key without repeated work. Each test states the saving and that the
result is the one the slow way gives."""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
from collections.abc import Callable
from pathlib import Path

import pytest

import attnc
from attnc.analysis import normal_form
from attnc.analysis.normal_form import canonicalize, shared_tables
from attnc.codegen import lower, signature
from attnc.errors import InternalError
from attnc.ir import verify as verify_module
from attnc.ir.nodes import FnIR, ModuleIR, Node, Op, ParamDecl, PatternIR, Type, make, var
from attnc.ir.printer import print_module
from attnc.ir.verify import verify
from attnc.passes import manager
from attnc.runtime import cache

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache of the test's own, so that every build renders its kernel."""
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    cache.clear_memory()
    return tmp_path / "cache"


def counting(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, argument: int = 0) -> list[object]:
    """Replace `owner.name` by a wrapper that records each call's argument at that position."""
    calls: list[object] = []
    original: Callable[..., object] = getattr(owner, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        calls.append(args[argument] if len(args) > argument else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def bound_masks() -> list[Node]:
    """The masks of a few patterns as `bind-params` leaves them (before `canonicalize`)."""
    stdlib = attnc.stdlib()
    kernels = [
        stdlib.causal(),
        stdlib.sliding_window(window=8),
        stdlib.neighborhood_2d(height=4, width=4, kernel_h=3, kernel_w=3),
        attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm(),
        attnc.load(EXAMPLES / "natten.attn").na_1d(),
    ]
    masks = [k._compiled.passes.modules["bind-params"].entry.mask for k in kernels]
    return [m for m in masks if m is not None]


# ---- stage texts -------------------------------------------------------------------------------------


def test_a_build_prints_no_stage_until_one_is_read(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    printed = counting(monkeypatch, manager, "print_module")
    kernel = attnc.stdlib().sliding_window(window=16)
    assert printed == []
    text = kernel.ir("canonicalize")
    assert text == print_module(kernel._compiled.passes.modules["canonicalize"])
    assert kernel.ir("canonicalize") == text
    assert len(printed) == 1


# ---- the normal form's shared tables -----------------------------------------------------------------


def test_inside_shared_tables_an_expression_is_normalised_once(monkeypatch: pytest.MonkeyPatch) -> None:
    mask = bound_masks()[-1].canonical  # the interned twin, without the source's locations
    applied = counting(monkeypatch, normal_form, "_apply_rules")
    with shared_tables():
        first = canonicalize(mask)
        rules_once = len(applied)
        again = canonicalize(mask)
        of_normal_form = canonicalize(first)
    assert rules_once > 0
    assert again is first and of_normal_form is first
    assert len(applied) == rules_once


def test_shared_tables_give_each_expression_the_normal_form_a_fresh_call_gives() -> None:
    masks = bound_masks()
    with shared_tables() as tables:
        shared = [canonicalize(m) for m in masks]
        normal = [n for context in tables.contexts.values() for n in context.normal]
        settled = [n for context in tables.contexts.values() for n in context.settled]
    assert shared == [canonicalize(m) for m in masks]  # each outside any table: computed afresh
    assert len(normal) > 20 and len(settled) > 20
    assert all(canonicalize(n) == n for n in normal)  # what the tables call normal is, on its own
    assert all(canonicalize(m) == m for n in settled for m in n.walk())  # and so is all of a settled one


def test_the_pass_manager_shares_the_tables_between_passes(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    natten = attnc.load(EXAMPLES / "natten.attn")
    opened = counting(monkeypatch, normal_form, "_Tables")
    natten.na_1d()
    assert len(opened) == 1  # one compilation, one set of tables, however many canonicalize calls


# ---- verification ------------------------------------------------------------------------------------


def module_with_mask(mask: Node, params: tuple[ParamDecl, ...]) -> ModuleIR:
    return ModuleIR(fns=(), patterns=(PatternIR("p", params=params, mask=mask),))


def test_a_verified_expression_is_checked_again_only_in_its_symbols(monkeypatch: pytest.MonkeyPatch) -> None:
    window = Node(Op.REF, Type.INT, (), "verify_speed_window")
    distance = make(Op.SUB, make(Op.MUL, var("q"), var("q")), make(Op.ABS, var("kv")))
    mask = make(Op.AND, make(Op.LE, distance, window), make(Op.GE, var("q"), var("kv")))
    verify(module_with_mask(mask, (ParamDecl("verify_speed_window", Type.INT),)))
    checked = counting(monkeypatch, verify_module._Verifier, "one", argument=2)  # (self, where, node, ...)
    with pytest.raises(InternalError, match=r"\$verify_speed_window does not name a int in scope"):
        verify(module_with_mask(mask, ()))  # the same nodes, in a scope without the parameter
    assert {n.op for n in checked} == {Op.VAR, Op.REF}  # type: ignore[attr-defined]


# ---- the rendered kernel's check and the cache key ---------------------------------------------------


def test_the_check_finds_every_argument_and_stored_name_ast_walk_finds(cache_root: Path) -> None:
    source = attnc.load(EXAMPLES / "natten.attn").na_1d().ir("lower-triton")
    tree = ast.parse(source)

    def spelt(nodes: object) -> list[tuple[str, str, int]]:
        found = [
            ("arg", n.arg, n.lineno) if isinstance(n, ast.arg) else ("store", n.id, n.lineno)
            for n in nodes  # type: ignore[attr-defined]
            if isinstance(n, ast.arg) or (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
        ]
        return sorted(found)

    assert spelt(lower._bindings(tree)) == spelt(ast.walk(tree))
    assert len(spelt(ast.walk(tree))) > 50


def test_the_kernel_key_reads_the_templates_once_and_stays_the_key_it_was(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = attnc.stdlib().causal()
    pattern, spec = kernel._compiled.entry, kernel._compiled.spec
    cache.kernel_key(pattern, spec, "attention_fwd.py.jinja")
    reads = counting(monkeypatch, Path, "read_text")
    key = cache.kernel_key(pattern, spec, "attention_fwd.py.jinja")
    assert reads == []
    parts = [
        f"attnc {attnc.__version__}",
        f"triton {importlib.import_module('triton').__version__}",
        "template attention_fwd.py.jinja",
        *(f"{t.name}\n{t.read_text(encoding='utf-8')}" for t in sorted(lower.TEMPLATES.glob("*.jinja"))),
        f"signature.py\n{Path(signature.__file__).read_text(encoding='utf-8')}",  # the defs they render
        cache.structure_text(pattern),
        repr(spec),
    ]
    assert key == hashlib.sha256("\n\0".join(parts).encode()).hexdigest()  # kernels on disk stay valid


def test_a_kernel_source_is_parsed_once_where_it_is_loaded_and_never_by_its_build(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = attnc.load(EXAMPLES / "streaming_llm.attn")
    parses = counting(monkeypatch, ast, "parse")
    renders = cache.STATS.renders
    kernel = program.streaming_llm()
    source = kernel._compiled.source
    assert cache.STATS.renders == renders + 1 and parses == []
    # The module of the functions the kernel imports is compiled once per process, on its first import:
    # imported here, so that only the kernel's own source is counted whichever test ran first.
    importlib.import_module(lower.KERNEL_FUNCTIONS)
    compiled = counting(monkeypatch, builtins, "compile")
    cache.module(source, "interpreter")
    assert parses == [source.text]
    # `ast.parse` is `compile` to a tree; then that tree is compiled, not the text a second time.
    assert [type(c) for c in compiled] == [str, ast.Module] and compiled[0] == source.text


def test_a_backward_kernel_renders_the_exact_delta_loops_only_for_input_gradients() -> None:
    # The launcher sets EXACT_DELTA only with input gradients to compute: without any, the dQ kernel's
    # second copy of its key loops is never run, so it is not rendered (nor parsed, nor compiled).
    stdlib = attnc.stdlib()
    with_inputs = attnc.loads("pattern p { input x: float32[KV_LEN]\n score = s + x[kv] }").p()
    for kernel, rendered in ((stdlib.sliding_window(window=8), False), (with_inputs, True)):
        spec = lower.build_backward_spec(kernel.pattern)
        source = lower.render(spec, "attention_bwd.py.jinja")
        assert bool(spec.grad_inputs) is rendered
        assert ("if EXACT_DELTA:" in source) is rendered and ("delta_sum" in source) is rendered
        assert "EXACT_DELTA: tl.constexpr" in source  # the launcher passes it to every dQ kernel
        lower.checked_code(source, spec, "attention_bwd.py.jinja")


def test_an_interned_node_hashes_by_identity_and_its_located_twin_like_it() -> None:
    # Interned nodes keep object identity as hash and equality (no Python call per set or dict
    # operation); a located twin is equal to its interned twin, both ways, and hashes like it.
    from attnc.errors import Loc, SourceFile

    assert Node.__hash__ is object.__hash__ and Node.__eq__ is object.__eq__
    twin = make(Op.ADD, var("q"), var("kv"))
    located = make(Op.ADD, var("q", Loc(SourceFile("p.attn", "q"), 1, 1, 2)), var("kv"))
    assert located is not twin and located.canonical is twin and located.loc is None
    assert located == twin and twin == located and not twin != located  # noqa: SIM202
    assert hash(located) == hash(twin) and len({twin, located}) == 1
    assert {located: 1}[twin] == 1 and {twin: 1}[located] == 1
    assert make(Op.NEG, located).canonical is make(Op.NEG, twin)  # over a twin, the interned node


def test_walk_yields_each_node_once_after_its_operands_and_skips_whole_subtrees() -> None:
    def postorder(node: Node, skip: Callable[[Node], bool], seen: list[Node]) -> list[Node]:
        if node in seen or skip(node):
            return seen
        for a in node.args:
            postorder(a, skip, seen)
        if node not in seen:
            seen.append(node)
        return seen

    a = make(Op.ADD, var("q"), var("kv"))
    b = make(Op.MUL, a, a)
    root = make(Op.SUB, make(Op.ADD, b, a), make(Op.NEG, b))
    for skip in (lambda n: False, lambda n: n is b, lambda n: n.op is Op.VAR):
        assert list(root.walk(skip)) == postorder(root, skip, [])


def test_nodes_built_at_once_in_many_threads_are_one_object() -> None:
    import threading

    from attnc.ir.nodes import const

    built: list[list[Node]] = []
    start = threading.Barrier(4)

    def build() -> None:  # expressions no other test builds, so that the threads race to add them
        start.wait()
        built.append([make(Op.ADD, var("q"), const(7_700_000 + i)) for i in range(500)])

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len({id(n) for n in same}) == 1 for same in zip(*built, strict=True))


def test_derive_ranges_solves_each_atom_once_per_axis(monkeypatch: pytest.MonkeyPatch) -> None:
    # na_1d's mask is an `and` of `or`s: its normal form repeats each factor's atoms in several conjuncts.
    from attnc.passes import derive_ranges

    solved = counting(monkeypatch, derive_ranges._Solver, "_solve_atom", argument=1)
    kernel = attnc.load(EXAMPLES / "natten.attn").na_1d()
    conjuncts = derive_ranges.dnf(kernel._compiled.passes.modules["classify-tiles"].entry.mask)
    assert kernel.pattern.ranges is not None and len(conjuncts) > 1
    atoms_per_axis = {
        (target, atom)
        for target in ("kv", "q")
        for atoms in conjuncts
        for atom in atoms
        if target in atom.free
    }
    assert sum(len(c) for c in conjuncts) > len({a for c in conjuncts for a in c})  # atoms do repeat
    assert len(solved) == len(atoms_per_axis)


def test_the_emitters_of_a_spec_share_one_value_range_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    pattern = attnc.stdlib().neighborhood_3d(4, 4, 4, 3, 3, 3).pattern
    made = counting(monkeypatch, lower, "ValueRanges")
    spec, backward = lower.build_spec(pattern), lower.build_backward_spec(pattern)
    assert len(made) == 2  # one per spec, not one per emitter (rows, ranges, bodies; dQ and dK/dV)
    monkeypatch.setattr(lower, "_value_ranges", lambda pattern: None)  # each emitter its own
    assert lower.build_spec(pattern) == spec and lower.build_backward_spec(pattern) == backward


# ---- one rewrite for many roots, fixed points, shared value ranges -------------------------------


def test_canonicalize_all_gives_each_root_the_normal_form_canonicalize_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    masks = [m.canonical for m in bound_masks()]
    shared_part = masks[1]  # a sliding window's mask, also inside the conjunction below
    roots = (*masks, make(Op.AND, shared_part, make(Op.GE, var("q"), var("kv"))))
    alone = [canonicalize(r) for r in roots]  # each outside any table: computed afresh
    rounds = counting(monkeypatch, normal_form, "_inner_linear")
    assert normal_form.canonicalize_all(roots) == tuple(alone)
    assert 1 < len(rounds) < len(roots)  # rounds over all the roots at once, not rounds per root


def test_the_linear_forms_the_rules_build_are_fixed_points_of_every_rule() -> None:
    # What lets the rewrite give a rule's result (`_fixed`) to no rule again.
    window, first = Node(Op.PARAM, Type.INT, (), "fixed_window"), var("kv_first")
    atoms = [var("q"), first, window, make(Op.FLOORDIV, var("kv"), const_int(3))]
    cases = [
        ({atoms[0]: 1, atoms[1]: -1}, -1),
        ({atoms[2]: -2, atoms[3]: 5}, 7),
        ({atoms[0]: -1}, 0),
        ({atoms[1]: 3, atoms[2]: 1, atoms[3]: -4}, -9),
    ]
    ranges = normal_form.ValueRanges()
    for terms, constant in cases:
        form = normal_form.build_linear(terms, constant)
        assert normal_form._apply_rules(form, ranges) is None
        for comparison in (Op.LE, Op.GE, Op.EQ, Op.NE, Op.LT):
            compared = normal_form._int_compare(make(comparison, form, const_int(2)))
            assert compared is not None and normal_form._apply_rules(compared, ranges) is None


def test_a_fixed_rule_result_is_given_to_no_rule_again(monkeypatch: pytest.MonkeyPatch) -> None:
    messy = make(Op.SUB, make(Op.ADD, var("q"), const_int(3)), make(Op.NEG, make(Op.NEG, var("kv"))))
    root = make(Op.LE, messy, const_int(10))
    applied = counting(monkeypatch, normal_form, "_apply_rules")
    with shared_tables():
        form = canonicalize(root)
    assert form == canonicalize(root) and form.op is Op.LE and form.args[0].op is Op.SUB  # q - kv <= 7
    # The comparison and the linear form the rules made were not checked again in the second round;
    # nor was any leaf, which no rule rewrites.
    assert form not in applied and form.args[0] not in applied
    assert all(n.args for n in applied)


def test_the_canonicalize_pass_leaves_only_interned_nodes(cache_root: Path) -> None:
    kernel = attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm()
    before = kernel._compiled.passes.modules["bind-params"].entry
    after = kernel._compiled.passes.modules["canonicalize"].entry
    assert before.mask is not None and any(n.loc is not None for n in before.mask.walk())
    assert after.mask is not None and all(n is n.canonical for n in after.mask.walk())


def test_a_compilation_bounds_its_values_with_one_value_range_analysis(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnc.analysis import intervals

    shared = counting(monkeypatch, normal_form, "ValueRanges")
    own = counting(monkeypatch, intervals, "ValueRanges")
    codegen = counting(monkeypatch, lower, "ValueRanges")
    kernel = attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm()
    assert kernel.pattern.ranges is not None
    # canonicalize, classify-tiles, derive-ranges and fuse: one, for the inputs' dtypes. The kernel's
    # code has its own, which knows the values of the rows `fuse` hoisted into lets.
    assert len(shared) == 1 and own == [] and len(codegen) == 1


def test_derive_ranges_builds_its_affine_bounds_in_normal_form() -> None:
    from attnc.passes.derive_ranges import _affine

    x = make(Op.SUB, make(Op.ADD, var("q_last"), Node(Op.PARAM, Type.INT, (), "affine_w")), const_int(1))
    for scale, offset in ((1, 0), (-1, 0), (1, -1), (4, 3), (-2, 5)):
        built = _affine(x, scale, offset)
        assert canonicalize(built) is built
        assert canonicalize(
            make(Op.SUB, built, make(Op.ADD, make(Op.MUL, x, const_int(scale)), const_int(offset)))
        ) == const_int(0)


def const_int(value: int) -> Node:
    return Node(Op.CONST, Type.INT, (), value)


def test_verification_after_a_pass_checks_only_the_results_it_changed(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from attnc.ir.results import TileClasses

    modules = attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm()._compiled.passes.modules
    before, after = modules["derive-ranges"], modules["block-sparsify"]  # block-sparsify sets sparsity
    checked = counting(monkeypatch, verify_module._Verifier, "result", argument=2)
    verify(after, "block-sparsify", before)
    assert not any(str(what).startswith(("tiles", "range")) for what in checked)
    verify(after, "block-sparsify")  # without the stage before: everything
    assert any(str(what).startswith("range") for what in checked)
    # A result the pass did change is checked, and a broken one still fails.
    entry = after.entry
    assert entry.tiles is not None
    broken = after.with_entry(replace(entry, tiles=TileClasses(any=var("q"), all=entry.tiles.all)))
    with pytest.raises(InternalError, match="tiles any is not bool"):
        verify(broken, "block-sparsify", after)


def test_the_text_that_names_a_kernel_to_the_ops_is_the_printed_pattern_printed_once(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnc.runtime import registry

    attnc.api.clear_memory()  # every pattern below compiles afresh
    for_key, for_ops = (
        counting(monkeypatch, cache, "pattern_body"),
        counting(monkeypatch, registry, "print_pattern"),
    )
    pattern = attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm
    kernels = [pattern(), pattern(window=64), attnc.stdlib().neighborhood_3d(4, 4, 4, 3, 3, 3)]
    assert len(for_key) == 2 and for_ops == []  # once per structure, for its cache key; not for the ops
    for kernel in kernels:
        assert kernel._op_pattern == print_pattern_text(kernel.pattern)
        assert registry.find(kernel._op_pattern) is kernel._forward


def print_pattern_text(pattern: PatternIR) -> str:
    from attnc.ir.printer import print_pattern

    return print_pattern(pattern)


def test_a_one_term_linear_form_is_not_taken_for_a_fixed_point() -> None:
    # `abs(-abs(q)) + kv - kv`: the first round makes the abs `abs(abs(q))` and the sum that one term,
    # itself; only a later round makes it `abs(q)`, so the term must not be filed as finished.
    inner = make(Op.ABS, make(Op.NEG, make(Op.ABS, var("q"))))
    root = make(Op.SUB, make(Op.ADD, inner, var("kv")), var("kv"))
    with shared_tables():
        form = canonicalize(root)
    assert canonicalize(form) == form  # a fixed point, as a fresh call sees it
    assert not any(n.op is Op.ABS and n.args[0].op is Op.ABS for n in form.walk())


def test_verification_after_a_pass_checks_the_sparsity_against_changed_ranges(cache_root: Path) -> None:
    from dataclasses import replace

    modules = attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm()._compiled.passes.modules
    after = modules["block-sparsify"]
    assert after.entry.sparsity is not None and after.entry.sparsity.analytic
    dropped = after.with_entry(replace(after.entry, ranges=None))  # the same sparsity object
    with pytest.raises(InternalError, match="ranges"):
        verify(dropped, "some-pass", after)


def test_combine_adds_a_multiple_of_the_second_terms_and_drops_cancelled_atoms() -> None:
    q, kv, w = var("q"), var("kv"), Node(Op.PARAM, Type.INT, (), "combine_w")
    first, second = {q: 1, kv: -1}, {kv: -1, w: 2}
    assert normal_form.combine(first, second, -1) == {q: 1, w: -2}
    assert normal_form.combine(first, second, 3) == {q: 1, kv: -4, w: 6}
    assert first == {q: 1, kv: -1} and second == {kv: -1, w: 2}  # the operands are left as they were


def test_a_node_the_rules_left_is_not_given_to_them_again_in_a_later_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first round rewrites both comparisons and rebuilds the `and` over them, which the rules then
    # leave: the second round, which confirms the fixed point, asks them of no node a second time.
    w = Node(Op.PARAM, Type.INT, (), "rounds_w")
    root = make(Op.AND, make(Op.LE, var("kv"), var("q")), make(Op.LT, make(Op.SUB, var("q"), var("kv")), w))
    applied = counting(monkeypatch, normal_form, "_apply_rules")
    with shared_tables():
        form = canonicalize(root)
    asked = list(applied)
    assert form.op is Op.AND and form != root and canonicalize(form) == form
    assert len(asked) == len(set(asked)) == 3  # the two comparisons, then the `and` over their forms


def test_derive_ranges_bounds_a_linear_form_from_its_atoms_in_normal_form() -> None:
    # The ends `interval` finds for the form's tree, normalised, without building that tree.
    from attnc.analysis.intervals import IntervalAnalysis
    from attnc.passes.derive_ranges import _Solver

    pattern = attnc.loads("pattern p { mask = kv <= q }").p().pattern
    w = Node(Op.PARAM, Type.INT, (), "bounds_w")
    cases = [({var("q"): 1, w: -1}, 1), ({var("q"): -2, var("b"): 1, w: 3}, -7), ({var("kv"): 1}, 0)]
    for target in ("kv", "q"):
        solver = _Solver(pattern, target, normal_form.ValueRanges(pattern))
        analysis = IntervalAnalysis(pattern, solver.box)
        with shared_tables():
            for terms, constant in cases:
                found = solver._linear_interval(terms, constant)
                tree = analysis.interval(normal_form.build_linear(terms, constant))
                for end, expected in ((found.lo, tree.lo), (found.hi, tree.hi)):
                    assert end is not None and expected is not None
                    assert canonicalize(end) is end and end == canonicalize(expected)


def test_existing_finds_the_live_node_and_builds_none() -> None:
    from attnc.ir import nodes

    x = make(Op.SUB, var("q"), Node(Op.PARAM, Type.INT, (), "existing_w"))
    size = len(nodes._TABLE)
    assert nodes.existing(Op.SUB, Type.INT, x.args) is x
    assert nodes.existing(Op.ADD, Type.INT, x.args) is None and len(nodes._TABLE) == size


def test_a_junction_looks_for_complements_without_building_negations() -> None:
    from attnc.ir import nodes

    def live(op: Op, *args: Node) -> bool:
        ref = nodes._TABLE.get((op, Type.BOOL, None, args))
        return ref is not None and ref() is not None

    # Atoms of this test alone: a node over q/kv could be alive from any earlier compilation.
    a, b, c = (Node(Op.PARAM, Type.INT, (), f"junction_{n}") for n in "abc")
    x, y = make(Op.SUB, a, b), make(Op.SUB, b, c)
    three, five = const_int(3), const_int(5)
    with shared_tables():
        contradiction = make(Op.AND, make(Op.LE, x, three), make(Op.GT, x, three))
        assert canonicalize(contradiction) == Node(Op.CONST, Type.BOOL, (), False)
        canonicalize(make(Op.OR, make(Op.LE, y, three), make(Op.GE, x, five)))
        # `b - c <= 3` and `a - b >= 5` have no complement among the operands: none was made.
        assert not live(Op.GT, y, three) and not live(Op.LT, x, five)


def test_a_linear_form_knows_its_terms_without_a_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    w = Node(Op.PARAM, Type.INT, (), "terms_w")
    terms = {var("q_first"): 2, w: -1, make(Op.FLOORDIV, var("kv_last"), const_int(4)): 3}
    walks = counting(monkeypatch, normal_form, "_linear")
    with shared_tables():
        form = normal_form.linear_form(terms, -5)
        assert normal_form.linear(form) == (terms, -5) and walks == []
    assert normal_form._linear(form) == (terms, -5)  # what the walk finds


# ---- round 5: one inline per build, one walk for many roots, verification of what changed -----------


def test_a_kernel_build_inlines_its_pattern_once(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from attnc.passes import inline

    attnc.api.clear_memory()
    inlined = counting(monkeypatch, inline._Inliner, "entry")
    kernel = attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm()
    # `static_names` inlines to decide the static parameters; the pipeline starts from that module.
    assert len(inlined) == 1
    modules = kernel._compiled.passes.modules
    assert print_module(modules["inline"]) == print_module(inline.Inline().run(modules["input"]))


def test_walk_all_yields_each_node_of_several_roots_once_operands_first() -> None:
    from attnc.ir.nodes import walk_all

    w = Node(Op.PARAM, Type.INT, (), "walk_all_w")
    shared = make(Op.SUB, var("q"), w)
    first, second = make(Op.ADD, shared, var("kv")), make(Op.MUL, shared, shared)
    walked = list(walk_all([first, second]))
    # What walking each root in turn gives, less what the first root yielded already.
    assert walked == [*first.walk(), *(n for n in second.walk() if n not in set(first.walk()))]
    assert len(walked) == len(set(walked)) and walked[-1] is second
    assert list(walk_all([first, second], skip=lambda n: n is shared)) == [var("kv"), first, second]


def test_rewrite_all_gives_each_roots_rewrite_applying_the_rule_once_per_node() -> None:
    from attnc.ir.rewrite import rewrite, rewrite_all

    w = Node(Op.PARAM, Type.INT, (), "rewrite_all_w")
    shared = make(Op.SUB, var("q"), w)
    roots = [make(Op.ADD, shared, var("kv")), make(Op.MUL, shared, const_int(2)), shared]
    seen: list[Node] = []

    def swap(node: Node) -> Node | None:  # q and kv change places
        seen.append(node)
        return var("kv") if node == var("q") else var("q") if node == var("kv") else None

    together = rewrite_all(roots, swap)
    assert len(seen) == len(set(seen)) == len(set(walk for r in roots for walk in r.walk()))
    assert together == [rewrite(r, swap) for r in roots]
    assert together[2] == make(Op.SUB, var("kv"), w)


def test_bind_params_substitutes_and_folds_each_expression_in_one_rewrite(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnc.passes import bind_params

    module = attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm()._compiled.passes.modules["inline"]
    rewritten = counting(monkeypatch, bind_params, "rewrite")
    bound = bind_params.BindParams((("window", 256), ("sinks", 4)), frozenset({"window"})).run(module)
    assert len(rewritten) == 1  # the mask: no reduction to unroll, so no second fold
    assert print_module(bound).count("!sinks") == 1 and "!window" not in print_module(bound)
    assert "sub(q, kv)" in print_module(bound) and "256" in print_module(bound)


def test_bind_params_bounds_an_inlined_pattern_with_the_compilations_shared_ranges(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnc.passes import bind_params

    own = counting(monkeypatch, bind_params, "ValueRanges")
    shared = counting(monkeypatch, normal_form, "ValueRanges")
    attnc.api.clear_memory()
    attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm()
    assert own == [] and len(shared) == 1  # the one `canonicalize` and the analyses use too


def test_verification_after_fuse_does_not_check_again_the_results_lets_leave_valid(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    modules = attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm()._compiled.passes.modules
    before, after = modules["block-sparsify"], modules["fuse"]
    assert len(after.entry.lets) > len(before.entry.lets)  # fuse hoisted a row into a let
    checked = counting(monkeypatch, verify_module._Verifier, "result", argument=2)
    verify(after, "fuse", before)
    assert checked and not any(str(what).startswith(("tiles", "range")) for what in checked)
    # Lets changed rather than added: everything is checked again.
    changed = before.with_entry(replace(before.entry, lets=(("row_0", var("q")),)))
    verify(after, "fuse", changed)
    assert any(str(what).startswith("range") for what in checked)


def test_verifying_a_marked_value_again_walks_none_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    mask = make(Op.LE, make(Op.SUB, var("q"), Node(Op.REF, Type.INT, (), "marked_w")), var("kv"))
    module = module_with_mask(mask, (ParamDecl("marked_w", Type.INT),))
    verify(module)  # marks the mask's nodes
    walks = counting(monkeypatch, Node, "walk")
    verify(module)
    assert walks == []
    with pytest.raises(InternalError, match=r"\$marked_w does not name a int in scope"):
        verify(module_with_mask(mask, ()))  # its symbols are still checked where it stands


def test_the_interval_analysis_builds_linear_ends_and_comparisons_in_normal_form() -> None:
    # `q - kv + 3` over a tile: its ends are `q_first - kv_last + 3` and `q_last - kv_first + 3`, built
    # as the normal form's linear shape (not as `add(add(q_first, neg(kv_last)), 3)`, which the tile
    # passes' canonicalize would take apart again); a comparison of them as `E op c`.
    from attnc.analysis.intervals import IntervalAnalysis
    from attnc.passes.classify_tiles import TILE_BOX

    pattern = attnc.loads("pattern p { mask = kv <= q }").p().pattern
    q, kv = var("q"), var("kv")
    (q_first, q_last), (kv_first, kv_last) = TILE_BOX["q"], TILE_BOX["kv"]
    three = const_int(3)
    cases = [
        (make(Op.ADD, make(Op.SUB, q, kv), three), make(Op.ADD, make(Op.SUB, q_first, kv_last), three)),
        (make(Op.NEG, make(Op.SUB, kv, q)), make(Op.SUB, q_first, kv_last)),
        (
            make(Op.MUL, make(Op.SUB, q, kv), const_int(-2)),
            make(Op.MUL, make(Op.SUB, q_last, kv_first), const_int(-2)),
        ),
    ]
    with shared_tables():
        analysis = IntervalAnalysis(pattern, TILE_BOX)
        for expression, lowest in cases:
            lo = analysis.interval(expression).lo
            assert lo is not None and canonicalize(lo) is lo and lo == canonicalize(lowest)
        truth = analysis.truth(make(Op.LE, make(Op.SUB, q, kv), three))
        for side in (truth.may, truth.must):
            assert side.op is Op.LE and side.args[1].op is Op.CONST and canonicalize(side) is side
        assert truth.must == canonicalize(make(Op.LE, make(Op.SUB, q_last, kv_first), three))


# ---- round 7: the printer's own walk, the key's text without a copy, the cache's temporary files ------


def test_the_printer_numbers_a_dag_operands_first_without_walking_it_through_walk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The printer walks the nodes it names itself (no generator, no `seen` set besides its names), in
    # `Node.walk`'s order: operands first, left to right, a shared node once, leaves inline.
    from attnc.ir import nodes
    from attnc.ir.printer import print_fn

    a = make(Op.ADD, var("q"), var("kv"))
    b = make(Op.MUL, a, a)
    body = make(Op.SUB, make(Op.ADD, b, a), make(Op.NEG, b))
    fn = FnIR("f", (), body)

    def no_walk(*args: object, **kwargs: object) -> None:
        raise AssertionError("the printer walked a node through walk_all")

    monkeypatch.setattr(nodes, "walk_all", no_walk)
    assert print_fn(fn) == "\n".join(
        [
            "fn f() -> int {",
            "  %0 = add(q, kv) : int",
            "  %1 = mul(%0, %0) : int",
            "  %2 = add(%1, %0) : int",
            "  %3 = neg(%1) : int",
            "  %4 = sub(%2, %3) : int",
            "  return %4",
            "}",
        ]
    )


def test_the_structure_text_is_the_printed_pattern_less_its_header_printing_no_header(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not the whole text of a renamed copy of the pattern, split after its header line.
    import dataclasses

    from attnc.ir import printer

    pattern = attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm().pattern
    headers = counting(monkeypatch, printer, "pattern_header")
    structure = cache.structure_text(pattern)
    assert headers == []
    assert printer.print_pattern(pattern) == f"{printer.pattern_header(pattern)}\n{structure}"
    renamed = dataclasses.replace(pattern, name="other", bindings=(("x", 1),))
    assert cache.structure_text(renamed) == structure


def test_a_kernel_file_is_written_through_a_numbered_private_file_not_a_random_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import itertools
    import os
    import stat
    import tempfile

    def no_mkstemp(*args: object, **kwargs: object) -> None:
        raise AssertionError("write_atomic drew a random name")

    monkeypatch.setattr(tempfile, "mkstemp", no_mkstemp)
    monkeypatch.setattr(cache, "_TEMPORARY_NUMBERS", itertools.count(5))
    stale = tmp_path / f".k.py.{os.getpid()}.5.tmp"  # a name some file has already: the next one is taken
    stale.write_text("left behind")
    cache.write_atomic(tmp_path / "k.py", "x = 1\n")
    assert (tmp_path / "k.py").read_bytes() == b"x = 1\n"
    assert stat.S_IMODE((tmp_path / "k.py").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "k.py"]
    assert stale.read_text() == "left behind" and next(cache._TEMPORARY_NUMBERS) == 7


def test_a_tile_line_keeps_its_reads_less_the_module_constants_each_once() -> None:
    # What a line reads is kept per line (most lines are the templates' own): without `tl`, builtins
    # and keywords, which are never a tile function's parameter, and without repeats.
    assert lower._line_names("acc = tl.where(m, acc + min(x, x), acc)") == (("m", "acc", "x"), ("acc",))
    assert lower._line_names("for i in range(n):") == (("n",), ("i",))


def test_value_ranges_with_lets_take_the_passes_bounds_of_values_that_refer_to_no_let(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel spec bounds its values with the pattern's lets known; a value that refers to no let has
    # the bounds the passes' analysis (lets unknown) found, and is not bounded again.
    from attnc.analysis.value_ranges import ValueRanges
    from attnc.ir.nodes import const

    pattern = attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm().pattern
    lets = dict(pattern.lets)
    row = Node(Op.REF, Type.INT, (), "row_0")
    plain = make(Op.SUB, make(Op.ADD, var("q"), const(3)), var("kv"))
    refers = make(Op.ADD, make(Op.SUB, plain, row), const(1))
    expected = ValueRanges(pattern, lets).of(refers)
    with shared_tables():
        passes = normal_form.value_ranges(pattern)
        passes.fits(plain, refers)
        bounded = counting(monkeypatch, ValueRanges, "_range", argument=1)
        spec = ValueRanges(pattern, lets, known=passes)
        assert spec.of(plain) == passes.of(plain) and bounded == []
        assert spec.of(refers) == expected != passes.of(refers)
        assert row in bounded and refers in bounded and plain not in bounded


def test_a_compilation_builds_its_kernel_spec_in_the_tables_its_passes_shared(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnc import compiler

    build_spec = compiler.build_spec
    open_tables: list[object] = []

    def spying(pattern: PatternIR) -> object:
        open_tables.append(normal_form._open.tables)
        return build_spec(pattern)

    monkeypatch.setattr(compiler, "build_spec", spying)
    attnc.api.clear_memory()
    attnc.load(EXAMPLES / "streaming_llm.attn").streaming_llm()
    assert len(open_tables) == 1 and open_tables[0] is not None
