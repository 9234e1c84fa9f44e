"""Bottom-up rewriting of expressions, memoised over shared sub-expressions."""

from __future__ import annotations

from collections.abc import Callable, Collection

from attnc.ir.nodes import Node, Op

Rewriter = Callable[[Node], Node | None]


def rewrite(
    root: Node, rule: Rewriter, memo: dict[Node, Node] | None = None, leave: Collection[Node] = ()
) -> Node:
    """Apply rule bottom-up: children first, then the node rebuilt on them; None keeps the node.

    Each distinct node is rewritten once (`memo`, which a caller may share between calls: what is in
    it is not walked again), so the cost is linear in the DAG. Nodes in `leave` are rebuilt on their
    rewritten operands but not given to the rule."""
    memo = {} if memo is None else memo
    for node in root.walk(skip=memo.__contains__):
        rebuilt = node.with_args(tuple(memo[a] for a in node.args))
        replaced = None if node in leave else rule(rebuilt)
        memo[node] = rebuilt if replaced is None else replaced
    return memo[root]


def substitute(root: Node, values: dict[str, Node]) -> Node:
    """Replace each `$name` in values (params, fn arguments, lets) by its node."""
    if not values:
        return root

    def rule(node: Node) -> Node | None:
        if node.op is Op.REF and node.attr in values:
            return values[str(node.attr)]
        return None

    return rewrite(root, rule)
