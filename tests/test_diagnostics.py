"""Every diagnostic of a user error: its `AttnError` subclass, its location and its message.

A diagnostic reads `FILE:LINE:COL: error: REASON`, then the source line and a caret line (`^~~~`) under
the offending span (DESIGN.md sections 2 and 3). Each test here checks the exact class, the line and
column (both on `err.loc` and in the first line of the message), a key phrase of the reason and, with
`underlined`, the text the caret line marks.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import attnc
from attnc import (
    ArityError,
    AttnError,
    AttnImportError,
    AttnSyntaxError,
    AttnTypeError,
    CycleError,
    DuplicateError,
    InputError,
    InputTypeError,
    ParameterError,
    UnknownNameError,
)

# ---- helpers -----------------------------------------------------------------------------------------


def src(*lines: str) -> str:
    """Source text from its lines, so that line and column numbers are easy to read off."""
    return "\n".join(lines) + "\n"


def raised(action: Callable[[], object]) -> AttnError:
    """The AttnError that `action` raises (any other exception fails the test as it propagates)."""
    with pytest.raises(AttnError) as info:
        action()
    return info.value


def load_error(text: str) -> AttnError:
    return raised(lambda: attnc.loads(text))


def check(
    err: AttnError, cls: type[AttnError], line: int, col: int, phrase: str, file: str = "<string>"
) -> None:
    """err is exactly a `cls`, located at line:col of file, and its reason contains phrase."""
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    assert err.loc is not None, str(err)
    assert (err.loc.line, err.loc.col) == (line, col), str(err)
    first = str(err).splitlines()[0]
    assert first.startswith(f"{file}:{line}:{col}: error: "), first
    assert phrase in err.reason, err.reason
    assert first == f"{file}:{line}:{col}: error: {err.reason}"


def underlined(err: AttnError) -> str:
    """The text of the quoted source line that the caret line marks (`^` and the `~` after it)."""
    lines = str(err).splitlines()
    assert len(lines) >= 3, str(err)
    source, mark = lines[1], lines[2]
    assert set(mark.strip()) <= {"^", "~"} and mark.strip().startswith("^"), mark
    start = mark.index("^")
    return source[start : len(mark)]


# Names of lark terminals and rules that must never reach a user.
RAW_TOKEN = re.compile(
    r"\$END|\b_NL\b|\b(RPAR|LPAR|RSQB|LSQB|LBRACE|RBRACE|COLON|COMMA|EQUAL|NAME|INT|FLOAT|STRING|"
    r"MUL_OP|COMPARE|PLUS|MINUS|NOT|TRUE|FALSE)\b|__ANON|\b(rpar|lpar|rsqb|lsqb|lbrace|rbrace|colon|comma)\b"
)


# ---- syntax ------------------------------------------------------------------------------------------


def test_unexpected_token_says_what_was_expected_in_words() -> None:
    err = load_error(src("pattern p {", "    mask = kv <= q)", "}"))
    check(err, AttnSyntaxError, 2, 19, "unexpected ')'")
    assert err.reason == "unexpected ')', expected one of '}', end of line"
    assert underlined(err) == ")"


@pytest.mark.parametrize(
    "text",
    [
        src("pattern p {", "    mask = kv <= q)", "}"),
        src("pattern p(x: int = 1 {", "    mask = true", "}"),
        src("pattern p {", "    mask = 1 2", "}"),
        src("pattern p {", "    let mask = 1", "}"),
        src("pattern p(input: int) {", "    mask = true", "}"),
        src("pattern {", "    mask = true", "}"),
        src("pattern p {", "    mask = (q <= kv", "}"),
        src("pattern p {", "    mask = q <= kv and or kv", "}"),
        src("pattern p {", "    mask = q <= kv", "}", "foo"),
        src("pattern p {", "    mask = doc[q,]]", "}"),
        "pattern p {\n    mask = q <= kv",
        "pattern p(window: int = 3\n",
    ],
)
def test_syntax_error_reason_has_no_grammar_token_names(text: str) -> None:
    err = load_error(text)
    assert type(err) is AttnSyntaxError
    assert not RAW_TOKEN.search(err.reason), err.reason


def test_unexpected_character_is_located_at_the_character() -> None:
    err = load_error(src("pattern p {", "    mask = kv <= q $ 1", "}"))
    check(err, AttnSyntaxError, 2, 20, "unexpected character '$'")
    assert underlined(err) == "$"


def test_unexpected_non_ascii_character_is_named() -> None:
    err = load_error(src("pattern p {", "    mask = q ≤ kv", "}"))
    check(err, AttnSyntaxError, 2, 14, "unexpected character '≤'")


def test_unexpected_end_of_file_points_after_the_last_character() -> None:
    err = load_error(src("pattern p {", "    mask = kv <= q"))
    check(err, AttnSyntaxError, 2, 19, "unexpected end of file")
    assert "'}'" in err.reason


def test_unterminated_import_string_is_an_unexpected_quote() -> None:
    err = load_error(src('import "foo', "pattern p {}"))
    check(err, AttnSyntaxError, 1, 8, "unexpected character '\"'")


def test_line_break_outside_parentheses_ends_the_expression() -> None:
    err = load_error(src("pattern p {", "    mask = kv <=", "        q", "}"))
    check(err, AttnSyntaxError, 2, 17, "unexpected end of line, expected an expression")


def test_line_break_before_an_operator_starts_a_new_statement() -> None:
    err = load_error(src("pattern p {", "    mask = q <= kv", "        + 1", "}"))
    check(err, AttnSyntaxError, 3, 9, "unexpected '+'")
    assert "'mask'" in err.reason and "'}'" in err.reason


def test_line_break_inside_parentheses_continues_the_expression() -> None:
    mod = attnc.loads(src("pattern p {", "    mask = (kv <=", "        q)", "}"))
    expected = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    assert torch.equal(mod.p().mask(5, 5)[0, 0], expected)


def test_keyword_where_a_name_is_expected() -> None:
    err = load_error(src("pattern p {", "    let mask = 1", "}"))
    check(err, AttnSyntaxError, 2, 9, "unexpected 'mask', expected a name")
    assert underlined(err) == "mask"


def test_unclosed_parenthesis_is_reported_at_the_token_that_cannot_follow() -> None:
    err = load_error(src("pattern p {", "    mask = (q <= kv", "}"))
    check(err, AttnSyntaxError, 3, 1, "unexpected '}', expected ')'")


def test_stray_text_after_a_declaration() -> None:
    err = load_error(src("pattern p {", "    mask = q <= kv", "}", "foo"))
    check(err, AttnSyntaxError, 4, 1, "unexpected 'foo'")
    assert "'pattern'" in err.reason and "'fn'" in err.reason and "'import'" in err.reason


def test_unknown_statement_lists_the_statements() -> None:
    err = load_error(src("pattern p {", "    mask = q <= kv", "    mask2 = true", "}"))
    check(err, AttnSyntaxError, 3, 5, "unexpected 'mask2'")
    assert all(f"'{s}'" in err.reason for s in ("input", "let", "mask", "score"))
    assert underlined(err) == "mask2"


def test_caret_lines_up_under_a_tab_indented_line() -> None:
    err = load_error(src("pattern p {", "\tmask = q <= kk", "}"))
    check(err, UnknownNameError, 2, 14, "unknown name 'kk'")
    assert underlined(err) == "kk"


# ---- unknown names -----------------------------------------------------------------------------------


def test_unknown_name_suggests_a_stdlib_pattern() -> None:
    err = load_error(src("pattern p {", "    mask = causl", "}"))
    check(err, UnknownNameError, 2, 12, "unknown name 'causl'; did you mean 'causal'?")
    assert underlined(err) == "causl"


def test_unknown_name_suggests_an_index_variable() -> None:
    err = load_error(src("pattern p {", "    mask = kv <= qq", "}"))
    check(err, UnknownNameError, 2, 18, "unknown name 'qq'; did you mean 'q'?")
    assert underlined(err) == "qq"


def test_unknown_name_suggests_a_let() -> None:
    err = load_error(src("pattern p {", "    let dist = q - kv", "    mask = dst < 4", "}"))
    check(err, UnknownNameError, 3, 12, "unknown name 'dst'; did you mean 'dist'?")


def test_unknown_function_suggests_a_pattern() -> None:
    err = load_error(src("pattern p {", "    mask = slding_window(4)", "}"))
    check(err, UnknownNameError, 2, 12, "did you mean 'sliding_window'?")
    assert underlined(err) == "slding_window"


def test_unknown_name_in_an_input_shape_suggests_a_size() -> None:
    err = load_error(src("pattern p {", "    input doc: int32[KV_LN]", "    mask = true", "}"))
    check(err, UnknownNameError, 2, 22, "unknown name 'KV_LN'; did you mean 'KV_LEN'?")


def test_unknown_name_in_a_fn_body_suggests_its_argument() -> None:
    err = load_error(src("fn f(xval: float) = xvl * 2.0"))
    check(err, UnknownNameError, 1, 21, "unknown name 'xvl'; did you mean 'xval'?")


def test_unknown_name_without_a_close_match_has_no_suggestion() -> None:
    err = load_error(src("pattern p {", "    mask = zzz", "}"))
    check(err, UnknownNameError, 2, 12, "unknown name 'zzz'")
    assert err.reason == "unknown name 'zzz'"


# ---- types -------------------------------------------------------------------------------------------


def test_bool_plus_int_is_located_at_the_operator() -> None:
    err = load_error(src("pattern p {", "    mask = kv + true", "}"))
    check(err, AttnTypeError, 2, 15, "operator '+' needs numbers, got int and bool")
    assert underlined(err) == "+"


def test_floor_division_of_floats_suggests_floor() -> None:
    err = load_error(src("pattern p {", "    score = s // 2.0", "}"))
    check(err, AttnTypeError, 2, 15, "operator '//' needs ints, got float and float")
    assert "floor(a / b)" in err.reason
    assert underlined(err) == "//"


def test_modulo_of_floats() -> None:
    err = load_error(src("pattern p {", "    score = s % 2.0", "}"))
    check(err, AttnTypeError, 2, 15, "operator '%' needs ints")


def test_mask_must_be_bool() -> None:
    err = load_error(src("pattern p {", "    mask = q - kv", "}"))
    check(err, AttnTypeError, 2, 12, "mask must be bool, got int")
    assert underlined(err) == "q - kv"


def test_score_must_not_be_bool() -> None:
    err = load_error(src("pattern p {", "    score = q < kv", "}"))
    check(err, AttnTypeError, 2, 13, "score must be float, got bool")
    assert underlined(err) == "q < kv"


def test_score_variable_in_mask() -> None:
    err = load_error(src("pattern p {", "    mask = s > 0.0", "}"))
    check(err, AttnTypeError, 2, 12, "'s' (the score) exists only inside")


def test_score_variable_in_a_fn_body() -> None:
    err = load_error(src("fn f(x: float) = s * x", "pattern p {", "    score = f(1.0)", "}"))
    check(err, AttnTypeError, 1, 18, "'s' (the score) exists only inside")


def test_let_that_uses_the_score_referenced_from_mask() -> None:
    err = load_error(src("pattern p {", "    let t = s * 2.0", "    mask = t > 0.0", "}"))
    check(err, AttnTypeError, 3, 12, "let 't' uses 's'")
    assert underlined(err) == "t"


def test_let_that_uses_the_score_through_another_let_referenced_from_mask() -> None:
    # `u` uses `t`, which uses `s`: referencing `u` from mask is the same error as referencing `t`.
    text = src("pattern p {", "    let t = s * 2.0", "    let u = t + 1.0", "    mask = u > 0.0", "}")
    err = raised(lambda: attnc.loads(text).p())
    check(err, AttnTypeError, 4, 12, "'s'")


def test_non_int_index() -> None:
    err = load_error(src("pattern p {", "    input doc: int32[KV_LEN]", "    mask = doc[1.5] == 0", "}"))
    check(err, AttnTypeError, 3, 16, "an index must be int, got float")
    assert underlined(err) == "1.5"


def test_comparing_bool_with_int() -> None:
    err = load_error(src("pattern p {", "    mask = (kv < 3) == 1", "}"))
    check(err, AttnTypeError, 2, 21, "'==' compares two numbers or two bools, got bool and int")
    assert underlined(err) == "=="


def test_ordering_bools() -> None:
    err = load_error(src("pattern p {", "    mask = (q < kv) < true", "}"))
    check(err, AttnTypeError, 2, 21, "'<' compares two numbers, got bool and bool")


def test_chained_comparison_reports_the_offending_link() -> None:
    err = load_error(src("pattern p {", "    mask = 1 < 2 < true", "}"))
    check(err, AttnTypeError, 2, 18, "'<' compares two numbers, got int and bool")


def test_and_on_ints_is_located_at_the_operand() -> None:
    err = load_error(src("pattern p {", "    mask = q and kv", "}"))
    check(err, AttnTypeError, 2, 12, "operand of 'and' must be bool, got int")
    assert underlined(err) == "q"


def test_or_operand_on_a_continued_line() -> None:
    err = load_error(src("pattern p {", "    mask = (q <= kv and", "        kv > 3 or q)", "}"))
    check(err, AttnTypeError, 3, 19, "operand of 'or' must be bool, got int")


def test_not_on_an_int() -> None:
    err = load_error(src("pattern p {", "    mask = not q", "}"))
    check(err, AttnTypeError, 2, 12, "'not' needs a bool, got int")


def test_negating_a_bool() -> None:
    err = load_error(src("pattern p {", "    mask = -true", "}"))
    check(err, AttnTypeError, 2, 12, "unary '-' needs a number, got bool")


def test_unknown_parameter_type() -> None:
    err = load_error(src("pattern p(x: integer = 1) {", "    mask = true", "}"))
    check(err, AttnTypeError, 1, 14, "unknown type 'integer'; expected int, float or bool")
    assert underlined(err) == "integer"


def test_unknown_input_dtype() -> None:
    err = load_error(src("pattern p {", "    input doc: int16[KV_LEN]", "    mask = true", "}"))
    check(err, AttnTypeError, 2, 16, "unknown dtype 'int16'")
    assert "int32" in err.reason
    assert underlined(err) == "int16"


def test_indexing_a_let() -> None:
    err = load_error(src("pattern p {", "    let t = q", "    mask = t[0] == 0", "}"))
    check(err, AttnTypeError, 3, 12, "'t' is not an input tensor and cannot be indexed")


def test_indexing_a_pattern() -> None:
    err = load_error(src("pattern p {", "    mask = causal[0]", "}"))
    check(err, AttnTypeError, 2, 12, "'causal' is not an input tensor")
    assert underlined(err) == "causal"


def test_using_an_input_without_indexing() -> None:
    err = load_error(src("pattern p {", "    input doc: int32[KV_LEN]", "    mask = doc == 0", "}"))
    check(err, AttnTypeError, 3, 12, "input 'doc' is a tensor: index it")
    assert underlined(err) == "doc"


def test_calling_a_local() -> None:
    err = load_error(src("pattern p {", "    let t = q", "    mask = t(0) == 0", "}"))
    check(err, AttnTypeError, 3, 12, "'t' is a let, not a function")


def test_calling_an_index_variable() -> None:
    err = load_error(src("pattern p {", "    mask = q(1) == 1", "}"))
    check(err, AttnTypeError, 2, 12, "'q' is not a function")


def test_using_a_fn_without_calling_it() -> None:
    err = load_error(src("fn f(x: int) = x + 1", "pattern p {", "    mask = f == 0", "}"))
    check(err, AttnTypeError, 3, 12, "fn 'f' must be called")


def test_using_a_builtin_without_calling_it() -> None:
    err = load_error(src("pattern p {", "    mask = abs == 1", "}"))
    check(err, AttnTypeError, 2, 12, "built-in function 'abs' must be called")
    assert underlined(err) == "abs"


def test_fn_argument_of_the_wrong_type() -> None:
    err = load_error(src("fn f(x: int) = x", "pattern p {", "    mask = f(q) == 0 and f(1.5) == 0", "}"))
    check(err, AttnTypeError, 3, 28, "argument 'x' of fn 'f' must be int, got float")
    assert underlined(err) == "1.5"


def test_pattern_argument_of_the_wrong_type() -> None:
    err = load_error(src("pattern p {", "    mask = sliding_window(window=true)", "}"))
    check(err, AttnTypeError, 2, 34, "argument 'window' of pattern 'sliding_window' must be int, got bool")


def test_default_of_the_wrong_type() -> None:
    err = load_error(src("pattern p(x: int = 1.5) {", "    mask = true", "}"))
    check(err, AttnTypeError, 1, 20, "the default of 'x' must be int, got float")


def test_index_variable_in_a_default() -> None:
    err = load_error(src("pattern p(x: int = q) {", "    mask = true", "}"))
    check(err, AttnTypeError, 1, 20, "'q' cannot be used in a default value")


def test_index_variable_in_an_input_shape() -> None:
    err = load_error(src("pattern p {", "    input doc: int32[q]", "    mask = true", "}"))
    check(err, AttnTypeError, 2, 22, "'q' cannot be used in an input's shape")


def test_float_input_dimension() -> None:
    err = load_error(src("pattern p {", "    input doc: int32[1.5]", "    mask = true", "}"))
    check(err, AttnTypeError, 2, 22, "a dimension must be int, got float")


def test_where_condition_must_be_bool() -> None:
    err = load_error(src("pattern p {", "    mask = where(q, 1, 2) == 1", "}"))
    check(err, AttnTypeError, 2, 18, "the condition of 'where' must be bool, got int")


def test_where_branches_must_agree() -> None:
    err = load_error(src("pattern p {", "    mask = where(q < kv, 1, true) == 1", "}"))
    check(err, AttnTypeError, 2, 12, "the branches of 'where' must have one type, got int and bool")


def test_math_builtin_on_a_bool() -> None:
    err = load_error(src("pattern p {", "    mask = abs(true) == 1", "}"))
    check(err, AttnTypeError, 2, 16, "'abs' needs numbers, got bool")


# ---- arity -------------------------------------------------------------------------------------------


def test_too_many_positional_arguments_to_a_fn() -> None:
    err = load_error(src("fn f(x: int) = x + 1", "pattern p {", "    mask = f(1, 2) == 0", "}"))
    check(err, ArityError, 3, 17, "fn 'f' takes 1 argument(s), got 2")
    assert underlined(err) == "2"


def test_unknown_keyword_argument_suggests_a_parameter() -> None:
    err = load_error(src("fn f(xval: int) = xval + 1", "pattern p {", "    mask = f(xvl=2) == 0", "}"))
    check(err, ArityError, 3, 14, "fn 'f' has no parameter 'xvl'; did you mean 'xval'?")
    assert underlined(err) == "xvl"


def test_argument_given_positionally_and_by_keyword() -> None:
    err = load_error(src("fn f(x: int) = x + 1", "pattern p {", "    mask = f(1, x=2) == 0", "}"))
    check(err, ArityError, 3, 17, "fn 'f' got parameter 'x' twice")


def test_missing_fn_argument() -> None:
    err = load_error(src("fn f(x: int) = x", "pattern p {", "    mask = f() == 0", "}"))
    check(err, ArityError, 3, 12, "fn 'f' needs argument 'x'")
    assert underlined(err) == "f()"


def test_pattern_call_missing_an_argument_without_default() -> None:
    err = load_error(src("pattern p {", "    mask = sliding_window()", "}"))
    check(err, ArityError, 2, 12, "pattern 'sliding_window' needs argument 'window'")
    assert underlined(err) == "sliding_window()"


def test_bare_pattern_name_whose_parameter_has_no_default() -> None:
    err = load_error(src("pattern p {", "    mask = sliding_window", "}"))
    check(err, ArityError, 2, 12, "pattern 'sliding_window' needs argument 'window'")
    assert underlined(err) == "sliding_window"


def test_too_many_arguments_to_a_pattern() -> None:
    err = load_error(src("pattern p(w: int = 2) {", "    mask = sliding_window(w) and sinks(w, 3)", "}"))
    check(err, ArityError, 2, 43, "pattern 'sinks' takes 1 argument(s), got 2")


def test_unknown_keyword_argument_to_a_pattern() -> None:
    err = load_error(src("pattern p {", "    mask = sliding_window(windw=2)", "}"))
    check(err, ArityError, 2, 27, "has no parameter 'windw'; did you mean 'window'?")


def test_builtin_with_too_many_arguments() -> None:
    err = load_error(src("pattern p {", "    mask = abs(q, kv) == 0", "}"))
    check(err, ArityError, 2, 12, "'abs' takes 1 argument(s), got 2")
    assert underlined(err) == "abs(q, kv)"


def test_builtin_with_too_few_arguments() -> None:
    err = load_error(src("pattern p {", "    mask = clamp(q, kv) == 0", "}"))
    check(err, ArityError, 2, 12, "'clamp' takes 3 argument(s), got 2")


def test_min_needs_at_least_two_arguments() -> None:
    err = load_error(src("pattern p {", "    mask = min(q) == 0", "}"))
    check(err, ArityError, 2, 12, "'min' takes at least 2 argument(s), got 1")


def test_builtin_with_keyword_arguments() -> None:
    err = load_error(src("pattern p {", "    mask = abs(x=1) == 1", "}"))
    check(err, ArityError, 2, 16, "built-in 'abs' takes no keyword arguments")


def test_wrong_number_of_indices() -> None:
    err = load_error(src("pattern p {", "    input doc: int32[KV_LEN]", "    mask = doc[q, kv] == 0", "}"))
    check(err, ArityError, 3, 12, "input 'doc' has 1 dimension(s), indexed with 2")
    assert underlined(err) == "doc[q, kv]"


# ---- duplicates --------------------------------------------------------------------------------------


def test_mask_given_twice() -> None:
    err = load_error(src("pattern p {", "    mask = true", "    mask = false", "}"))
    check(err, DuplicateError, 3, 5, "mask is already given at line 2")
    assert underlined(err) == "mask = false"


def test_score_given_twice() -> None:
    err = load_error(src("pattern p {", "    score = s", "    score = s", "}"))
    check(err, DuplicateError, 3, 5, "score is already given at line 2")


def test_let_given_twice() -> None:
    err = load_error(src("pattern p {", "    let a = 1", "    let a = 2", "    mask = true", "}"))
    check(err, DuplicateError, 3, 9, "'a' is already declared as a let at line 2")


def test_input_declared_twice() -> None:
    err = load_error(
        src(
            "pattern p {",
            "    input doc: int32[KV_LEN]",
            "    input doc: int32[KV_LEN]",
            "    mask = true",
            "}",
        )
    )
    check(err, DuplicateError, 3, 11, "'doc' is already declared as an input at line 2")


def test_parameter_declared_twice() -> None:
    err = load_error(src("pattern p(x: int, x: int) {", "    mask = true", "}"))
    check(err, DuplicateError, 1, 19, "parameter 'x' is declared twice")


def test_two_patterns_with_one_name() -> None:
    err = load_error(src("pattern p {", "    mask = true", "}", "pattern p {", "    mask = false", "}"))
    check(err, DuplicateError, 4, 9, "'p' is already defined at line 1")
    assert underlined(err) == "p"


def test_a_fn_and_a_pattern_with_one_name() -> None:
    err = load_error(src("fn p(x: int) = x", "pattern p {", "    mask = false", "}"))
    check(err, DuplicateError, 2, 9, "'p' is already defined at line 1")


def test_pattern_named_after_an_index_variable() -> None:
    err = load_error(src("pattern q {", "    mask = true", "}"))
    check(err, DuplicateError, 1, 9, "'q' is a built-in name and cannot be redefined")


def test_fn_named_after_a_builtin() -> None:
    err = load_error(src("fn min(x: int) = x"))
    check(err, DuplicateError, 1, 4, "'min' is a built-in name and cannot be redefined")
    assert underlined(err) == "min"


def test_let_named_after_an_index_variable() -> None:
    err = load_error(src("pattern p {", "    let q = 1", "    mask = true", "}"))
    check(err, DuplicateError, 2, 9, "'q' is a built-in name and cannot be redefined")


def test_input_named_s() -> None:
    err = load_error(src("pattern p {", "    input s: float32[KV_LEN]", "    mask = true", "}"))
    check(err, DuplicateError, 2, 11, "'s' is a built-in name")


def test_parameter_named_after_an_index_variable() -> None:
    err = load_error(src("pattern p(kv: int = 1) {", "    mask = true", "}"))
    check(err, DuplicateError, 1, 11, "'kv' is a built-in name and cannot be a parameter")


def test_let_with_the_name_of_a_parameter() -> None:
    err = load_error(src("pattern p(x: int = 1) {", "    let x = 1", "    mask = true", "}"))
    check(err, DuplicateError, 2, 9, "'x' is already declared as a param at line 1")


def test_referenced_pattern_input_that_clashes_with_the_own_input() -> None:
    text = src(
        "pattern a {",
        "    input doc: int32[KV_LEN]",
        "    mask = doc[kv] == 0",
        "}",
        "pattern c {",
        "    input doc: int64[KV_LEN]",
        "    mask = a and doc[kv] == 0",
        "}",
    )
    err = raised(lambda: attnc.loads(text).c())
    check(err, DuplicateError, 7, 12, "input 'doc' of pattern 'a' differs")


def test_input_of_a_pattern_a_fn_references_clashes_at_each_call() -> None:
    """A fn call is expanded once and used twice (in `p1` and `p2`): each use merges the inputs of the
    patterns its body references, so the clash with `p2`'s own `t` is located at `p2`'s call."""
    text = src(
        "pattern a {",
        "    input t: int32[4]",
        "    mask = t[kv] > 0",
        "}",
        "fn f(x: int) = a and x >= 0",
        "pattern p1 {",
        "    input t: int32[4]",
        "    mask = f(q) and t[kv] > 1",
        "}",
        "pattern p2 {",
        "    input t: int32[5]",
        "    mask = f(q) and t[kv] > 1",
        "}",
        "pattern main {",
        "    mask = p1 or p2",
        "}",
    )
    err = raised(lambda: attnc.loads(text).main())
    check(err, DuplicateError, 12, 12, "input 't' of pattern 'a' differs")


# ---- imports -----------------------------------------------------------------------------------------


def test_import_of_a_missing_file(tmp_path: Path) -> None:
    main = tmp_path / "main.attn"
    main.write_text(src("pattern p {", "    mask = true", "}", 'import "missing.attn"'))
    err = raised(lambda: attnc.load(main))
    check(err, AttnImportError, 4, 1, "cannot read 'missing.attn'", file=str(main))
    assert underlined(err) == 'import "missing.attn"'


def test_import_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    main = tmp_path / "main.attn"
    main.write_text(src('import "lib"'))
    err = raised(lambda: attnc.load(main))
    check(err, AttnImportError, 1, 1, "cannot read 'lib'", file=str(main))


def test_import_of_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "binary.attn").write_bytes(b"pattern \xff\xfe {\n}\n")
    main = tmp_path / "main.attn"
    main.write_text(src("pattern p {", "    mask = true", "}", 'import "binary.attn"'))
    err = raised(lambda: attnc.load(main))
    check(err, AttnImportError, 4, 1, "binary.attn", file=str(main))


def test_import_cycle_between_two_files(tmp_path: Path) -> None:
    (tmp_path / "a.attn").write_text(src('import "b.attn"', "pattern pa {", "    mask = true", "}"))
    (tmp_path / "b.attn").write_text(src("pattern pb {", "    mask = true", "}", 'import "a.attn"'))
    err = raised(lambda: attnc.load(tmp_path / "a.attn"))
    assert type(err) is AttnImportError
    assert Path(err.loc.file.name).name == "b.attn"
    assert (err.loc.line, err.loc.col) == (4, 1)
    assert re.match(
        r"\S*b\.attn:4:1: error: import cycle: a\.attn -> b\.attn -> a\.attn$", str(err).splitlines()[0]
    )
    assert underlined(err) == 'import "a.attn"'


def test_a_file_that_imports_itself(tmp_path: Path) -> None:
    main = tmp_path / "self.attn"
    main.write_text(src('import "self.attn"'))
    err = raised(lambda: attnc.load(main))
    check(err, AttnImportError, 1, 1, "import cycle: self.attn -> self.attn", file=str(main))


def test_relative_import_from_a_subdirectory_works(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "helpers.attn").write_text(src("fn near(a: int, c: int, n: int) = a - c < n"))
    (tmp_path / "lib" / "window.attn").write_text(
        src('import "helpers.attn"', "pattern win(n: int = 2) {", "    mask = near(q, kv, n)", "}")
    )
    main = tmp_path / "main.attn"
    main.write_text(src('import "lib/window.attn"', "pattern p {", "    mask = causal and win(n=3)", "}"))
    mask = attnc.load(main).p().mask(6, 6)[0, 0]
    i = torch.arange(6)
    assert torch.equal(mask, (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3))


def test_syntax_error_in_an_imported_file_is_located_in_that_file(tmp_path: Path) -> None:
    (tmp_path / "syn.attn").write_text(src("pattern p {", "    mask = q <", "}"))
    main = tmp_path / "main.attn"
    main.write_text(src('import "syn.attn"'))
    err = raised(lambda: attnc.load(main))
    assert type(err) is AttnSyntaxError
    assert Path(err.loc.file.name).name == "syn.attn"
    assert (err.loc.line, err.loc.col) == (2, 15)
    assert str(err).splitlines()[1] == "      mask = q <"


def test_error_in_an_imported_file_names_a_path_that_leads_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The FILE of a diagnostic must let the user open the file: here `helpers.attn` lives in lib/, so a
    # bare "helpers.attn" (the text of the import inside lib/window.attn) names a file that does not exist.
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "helpers.attn").write_text(src("fn near(a: int, c: int) = a - c < true"))
    (tmp_path / "lib" / "window.attn").write_text(
        src('import "helpers.attn"', "pattern win {", "    mask = near(q, kv)", "}")
    )
    (tmp_path / "main.attn").write_text(src('import "lib/window.attn"', "pattern p {", "    mask = win", "}"))
    monkeypatch.chdir(tmp_path)
    err = raised(lambda: attnc.load("main.attn"))
    assert type(err) is AttnTypeError
    assert (err.loc.line, err.loc.col) == (1, 33)
    assert Path(err.loc.file.name).resolve() == (tmp_path / "lib" / "helpers.attn").resolve(), str(err)


def test_type_error_in_an_unused_pattern_of_an_imported_file_is_reported_by_load(tmp_path: Path) -> None:
    (tmp_path / "bad.attn").write_text(src("pattern bad {", "    mask = q + true", "}"))
    main = tmp_path / "main.attn"
    main.write_text(src('import "bad.attn"', "pattern p {", "    mask = causal", "}"))
    err = raised(lambda: attnc.load(main))
    assert type(err) is AttnTypeError
    assert Path(err.loc.file.name).name == "bad.attn"
    assert (err.loc.line, err.loc.col) == (2, 14)


def test_name_defined_in_two_imports_is_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "x1.attn").write_text(src("pattern z {", "    mask = true", "}"))
    (tmp_path / "x2.attn").write_text(src("pattern z {", "    mask = false", "}"))
    main = tmp_path / "main.attn"
    main.write_text(src('import "x1.attn"', 'import "x2.attn"', "pattern p {", "    mask = z", "}"))
    err = raised(lambda: attnc.load(main))
    check(err, UnknownNameError, 4, 12, "'z' is ambiguous", file=str(main))
    assert '"x1.attn"' in err.reason and '"x2.attn"' in err.reason


# ---- cycles ------------------------------------------------------------------------------------------


def test_recursive_fn() -> None:
    err = load_error(src("fn f(x: int) = f(x)"))
    check(err, CycleError, 1, 16, "fn 'f' refers to itself")
    assert underlined(err) == "f"


def test_mutually_recursive_fns() -> None:
    err = load_error(src("fn f(x: int) = g(x)", "fn g(x: int) = f(x)"))
    check(err, CycleError, 2, 16, "fn 'f' refers to itself")


def test_let_that_refers_to_itself() -> None:
    err = load_error(src("pattern p {", "    let a = a + 1", "    mask = a == 0", "}"))
    check(err, CycleError, 2, 13, "let 'a' depends on itself: a -> a")


def test_mutually_recursive_lets() -> None:
    err = load_error(src("pattern p {", "    let a = b2", "    let b2 = a", "    mask = a == 0", "}"))
    check(err, CycleError, 3, 14, "let 'a' depends on itself: a -> b2 -> a")


def test_pattern_that_refers_to_itself() -> None:
    err = load_error(src("pattern p {", "    mask = p", "}"))
    check(err, CycleError, 2, 12, "pattern 'p' refers to itself")


def test_mutually_referring_patterns() -> None:
    err = load_error(src("pattern a {", "    mask = b2", "}", "pattern b2 {", "    mask = a", "}"))
    check(err, CycleError, 5, 12, "pattern 'a' refers to itself")


# ---- parameters when a kernel is made ----------------------------------------------------------------

PARAMS = src(
    "pattern p(window: int, cap: float = 1.0, flag: bool = false) {",  # line 1
    "    mask = kv <= q and q - kv < window",
    "}",
)


@pytest.fixture
def params_module() -> attnc.Module:
    return attnc.loads(PARAMS)


def test_parameter_without_default_not_given(params_module: attnc.Module) -> None:
    err = raised(lambda: params_module.p())
    check(err, ParameterError, 1, 11, "parameter 'window' of pattern 'p' has no default and was not given")
    assert underlined(err) == "window"


def test_unknown_parameter_keyword(params_module: attnc.Module) -> None:
    err = raised(lambda: params_module.p(window=1, windw=2))
    check(err, ParameterError, 1, 9, "pattern 'p' has no parameter 'windw'")
    assert "window, cap, flag" in err.reason


def test_float_for_an_int_parameter(params_module: attnc.Module) -> None:
    err = raised(lambda: params_module.p(window=1.5))
    check(err, ParameterError, 1, 11, "parameter 'window' of pattern 'p' is int, got float 1.5")


def test_bool_for_an_int_parameter(params_module: attnc.Module) -> None:
    err = raised(lambda: params_module.p(window=True))
    check(err, ParameterError, 1, 11, "is int, got bool True")


def test_string_for_an_int_parameter(params_module: attnc.Module) -> None:
    err = raised(lambda: params_module.p(window="3"))
    check(err, ParameterError, 1, 11, "is int, got str '3'")


def test_int_for_a_bool_parameter(params_module: attnc.Module) -> None:
    err = raised(lambda: params_module.p(window=3, flag=1))
    check(err, ParameterError, 1, 42, "parameter 'flag' of pattern 'p' is bool, got int 1")
    assert underlined(err) == "flag"


def test_bool_for_a_float_parameter(params_module: attnc.Module) -> None:
    err = raised(lambda: params_module.p(window=3, cap=True))
    check(err, ParameterError, 1, 24, "parameter 'cap' of pattern 'p' is float, got bool True")


def test_too_many_positional_parameters(params_module: attnc.Module) -> None:
    err = raised(lambda: params_module.p(1, 2.0, True, 4))
    check(err, ParameterError, 1, 9, "pattern 'p' takes 3 parameter(s), got 4")


def test_parameter_given_positionally_and_by_keyword(params_module: attnc.Module) -> None:
    err = raised(lambda: params_module.p(1, window=2))
    check(err, ParameterError, 1, 9, "parameter 'window' of pattern 'p' given twice")


def test_missing_stdlib_parameter_is_located_in_the_stdlib() -> None:
    stdlib_text = (Path(attnc.__file__).parent / "stdlib.attn").read_text().splitlines()
    line = next(i for i, t in enumerate(stdlib_text, 1) if t.startswith("pattern sliding_window("))
    col = stdlib_text[line - 1].index("window:") + 1
    err = raised(lambda: attnc.stdlib().sliding_window())
    check(err, ParameterError, line, col, "parameter 'window' of pattern 'sliding_window'", file="<stdlib>")


# ---- inputs at call time -----------------------------------------------------------------------------

INPUTS = src(
    "pattern d(n: int = 4) {",  # line 1
    "    input doc: int32[BATCH, KV_LEN]",  # line 2: `doc` at column 11
    "    input w: float32[n]",  # line 3: `w` at column 11
    "    mask = doc[b, q] == doc[b, kv] and w[0] >= 0.0",
    "}",
    "pattern batched {",  # line 6
    "    mask = b == 0 or kv <= q",
    "}",
    "pattern headed {",  # line 9
    "    mask = h == 0 or kv <= q",
    "}",
)


@pytest.fixture
def inputs_module() -> attnc.Module:
    return attnc.loads(INPUTS)


def doc_ids(batch: int = 2, length: int = 8, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.zeros(batch, length, dtype=dtype)


def qkv(batch: int = 2, length: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, 1, length, 16, generator=gen) for _ in range(3))  # type: ignore[return-value]


def test_mask_missing_input(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.d().mask(8, 8, doc=doc_ids()))
    check(err, InputError, 3, 11, "input 'w' was not given")
    assert underlined(err) == "w"


def test_mask_unknown_input(inputs_module: attnc.Module) -> None:
    kern = inputs_module.d()
    err = raised(lambda: kern.mask(8, 8, doc=doc_ids(), w=torch.zeros(4), x=torch.zeros(4)))
    check(err, InputError, 1, 9, "pattern 'd' has no input 'x' (its inputs: doc, w)")


def test_mask_input_of_the_wrong_dtype(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.d().mask(8, 8, doc=doc_ids(dtype=torch.int64), w=torch.zeros(4)))
    check(err, InputError, 2, 11, "input 'doc' must be int32, got int64")
    assert underlined(err) == "doc"


def test_mask_input_of_the_wrong_shape(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.d().mask(8, 8, doc=doc_ids(length=7), w=torch.zeros(4)))
    check(err, InputError, 2, 11, "input 'doc' must have shape [2, 8], got [2, 7]")


def test_mask_input_of_the_wrong_rank(inputs_module: attnc.Module) -> None:
    err = raised(
        lambda: inputs_module.d().mask(8, 8, doc=torch.zeros(8, dtype=torch.int32), w=torch.zeros(4))
    )
    check(err, InputError, 2, 11, "input 'doc' must have 2 dimension(s), got shape [8]")


def test_mask_input_shape_given_by_a_parameter(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.d(n=4).mask(8, 8, doc=doc_ids(), w=torch.zeros(5)))
    check(err, InputError, 3, 11, "input 'w' must have shape [4], got [5]")


def test_mask_input_that_is_not_a_tensor(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.d().mask(8, 8, doc=doc_ids(), w=[0.0] * 4))
    check(err, InputTypeError, 3, 11, "input 'w' must be a torch.Tensor, got list")


def test_mask_batch_that_contradicts_an_input_shape(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.d().mask(8, 8, doc=doc_ids(batch=2), w=torch.zeros(4), batch=3))
    check(err, InputError, 2, 11, "input 'doc' must have shape [3, 8], got [2, 8]")


def test_mask_of_a_pattern_on_b_without_batch(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.batched().mask(8, 8))
    check(err, InputError, 6, 9, "pattern 'batched' depends on b or BATCH: pass batch=")
    assert underlined(err) == "batched"


def test_mask_of_a_pattern_on_h_without_num_heads(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.headed().mask(8, 8))
    check(err, InputError, 9, 9, "pass num_heads=")


def test_mask_with_a_negative_batch(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.batched().mask(8, 8, batch=-1))  # 0 is allowed: an empty mask
    check(err, InputError, 6, 9, "batch must be a non-negative int, got -1")


def test_mask_with_a_negative_length(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.batched().mask(-1, 8, batch=1))
    check(err, InputError, 6, 9, "q_len must be a non-negative int, got -1")


def test_mask_with_a_bool_batch(inputs_module: attnc.Module) -> None:
    err = raised(lambda: inputs_module.batched().mask(8, 8, batch=True))
    check(err, InputError, 6, 9, "batch must be a non-negative int, got True")


def test_reference_missing_input(inputs_module: attnc.Module) -> None:
    q, k, v = qkv()
    err = raised(lambda: inputs_module.d().reference(q, k, v, doc=doc_ids()))
    check(err, InputError, 3, 11, "input 'w' was not given")


def test_reference_unknown_input(inputs_module: attnc.Module) -> None:
    q, k, v = qkv()
    err = raised(lambda: inputs_module.d().reference(q, k, v, doc=doc_ids(), w=torch.zeros(4), bogus=q))
    check(err, InputError, 1, 9, "pattern 'd' has no input 'bogus'")


def test_reference_input_of_the_wrong_dtype(inputs_module: attnc.Module) -> None:
    q, k, v = qkv()
    err = raised(
        lambda: inputs_module.d().reference(q, k, v, doc=doc_ids(dtype=torch.float32), w=torch.zeros(4))
    )
    check(err, InputError, 2, 11, "input 'doc' must be int32, got float32")


def test_reference_input_whose_shape_disagrees_with_the_keys(inputs_module: attnc.Module) -> None:
    q, k, v = qkv(length=8)
    err = raised(lambda: inputs_module.d().reference(q, k, v, doc=doc_ids(length=9), w=torch.zeros(4)))
    check(err, InputError, 2, 11, "input 'doc' must have shape [2, 8], got [2, 9]")


def test_reference_input_of_the_wrong_rank(inputs_module: attnc.Module) -> None:
    q, k, v = qkv()
    err = raised(lambda: inputs_module.d().reference(q, k, v, doc=doc_ids()[0], w=torch.zeros(4)))
    check(err, InputError, 2, 11, "input 'doc' must have 2 dimension(s)")


def test_reference_query_that_is_not_4d(inputs_module: attnc.Module) -> None:
    q, k, v = qkv()
    err = raised(lambda: inputs_module.d().reference(q[0], k, v, doc=doc_ids(), w=torch.zeros(4)))
    check(err, InputError, 1, 9, "q must be a 4-D tensor [B, H, L, D], got [1, 8, 16]")


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.d().mask(8, 8, doc=doc_ids()),
        lambda m: m.d().mask(8, 8, doc=doc_ids(dtype=torch.int64), w=torch.zeros(4)),
        lambda m: m.d().reference(*qkv(), doc=doc_ids(length=9), w=torch.zeros(4)),
        lambda m: m.batched().mask(8, 8),
        lambda m: m.d(n=1.5),
    ],
    ids=["missing", "dtype", "shape", "no-batch", "param-type"],
)
def test_call_time_error_message_has_no_python_traceback(inputs_module: attnc.Module, call) -> None:
    err = raised(lambda: call(inputs_module))
    first, *rest = str(err).splitlines()
    assert re.fullmatch(r"<string>:\d+:\d+: error: [^\n]+", first), first
    assert "Traceback" not in str(err) and 'File "' not in str(err)
    assert len(rest) == 2 and set(rest[1].strip()) <= {"^", "~"}


# ---- user programs that must not crash the compiler --------------------------------------------------


def test_integer_literal_too_large_is_a_located_error() -> None:
    # Either load or the kernel reports it at the literal; a bare ValueError/OverflowError must not escape.
    text = src("pattern big {", "    mask = kv < 99999999999999999999999", "}")
    err = raised(lambda: attnc.loads(text).big().mask(4, 4))
    assert (err.loc.line, err.loc.col) == (2, 17), str(err)


def test_deeply_nested_parentheses_do_not_crash() -> None:
    text = src("pattern p {", "    mask = " + "(" * 500 + "kv <= q" + ")" * 500, "}")
    try:
        mask = attnc.loads(text).p().mask(3, 3)
    except AttnError as err:  # a located "nested too deeply" diagnostic is fine too
        assert err.loc is not None and err.loc.line == 2
    else:
        assert torch.equal(mask[0, 0], torch.tril(torch.ones(3, 3, dtype=torch.bool)))


def test_long_sum_does_not_crash() -> None:
    text = src("pattern p {", "    mask = q < " + " + ".join(["kv"] * 1000), "}")
    try:
        mask = attnc.loads(text).p().mask(3, 3)
    except AttnError as err:
        assert err.loc is not None and err.loc.line == 2
    else:
        i = torch.arange(3)
        assert torch.equal(mask[0, 0], i[:, None] < 1000 * i[None, :])


def test_mask_of_a_pattern_whose_mask_is_constant_does_not_crash() -> None:
    mask = attnc.stdlib().full().mask(2, 3)
    assert torch.equal(mask, torch.ones(1, 1, 2, 3, dtype=torch.bool))


def test_positional_argument_after_keyword_argument() -> None:
    text = src("fn f(x: int, y: int) = x < y", "pattern p {", "    mask = f(y=1, kv)", "}")
    err = raised(lambda: attnc.loads(text))
    check(err, AttnSyntaxError, 3, 19, "positional argument cannot follow a keyword argument")


def test_integer_overflow_in_constant_folding_is_located() -> None:
    text = src("pattern p {", "    mask = kv < 4611686018427387904 * 4", "}")
    err = raised(lambda: attnc.loads(text).p())
    check(err, AttnTypeError, 2, 17, "does not fit in 64 bits")


def test_a_located_error_pickles_with_its_message() -> None:
    """An error raised in a worker process (a DataLoader worker, a `multiprocessing` pool) reaches the
    parent with its class and message: `args` is the class's own arguments (reason, location)."""
    err = raised(lambda: attnc.loads(src("pattern p {", "    mask = kv < nope", "}")))
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is UnknownNameError and str(copy) == str(err) and repr(copy) == repr(err)
