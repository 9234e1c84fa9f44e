"""Bottom-up rewriting of expressions, memoised over shared sub-expressions."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from operator import is_

from attnc.ir.nodes import Node, Op, walk_all

Rewriter = Callable[[Node], Node | None]


def rewrite(
    root: Node,
    rule: Rewriter,
    memo: dict[Node, Node] | None = None,
    leave: Collection[Node] = (),
    keep: Callable[[Node], bool] | None = None,
) -> Node:
    """Apply rule bottom-up: children first, then the node rebuilt on them; None keeps the node.

    Each distinct node is rewritten once (`memo`, which a caller may share between calls: what is in
    it is not walked again), so the cost is linear in the DAG. Nodes in `leave` are rebuilt on their
    rewritten operands but not given to the rule. A node for which `keep` holds is its own rewrite,
    and nothing under it is walked: the caller knows the rule would leave all of it as it is."""
    return rewrite_all((root,), rule, memo, leave, keep)[0]


def rewrite_all(
    roots: Sequence[Node],
    rule: Rewriter,
    memo: dict[Node, Node] | None = None,
    leave: Collection[Node] = (),
    keep: Callable[[Node], bool] | None = None,
) -> list[Node]:
    """`rewrite` of each root, sharing one memo, in one walk over all of them (`walk_all`): what
    rewriting them in turn gives, without a walk and its set per root."""
    memo = {} if memo is None else memo

    def known(node: Node) -> bool:
        if node in memo:
            return True
        if keep is not None and keep(node):
            memo[node] = node
            return True
        return False

    for node in walk_all(roots, skip=known):
        rebuilt = _rebuilt(node, memo) if node.args else node
        replaced = None if node in leave else rule(rebuilt)
        memo[node] = rebuilt if replaced is None else replaced
    return [memo[root] for root in roots]


def _rebuilt(node: Node, memo: dict[Node, Node]) -> Node:
    """The node over its operands' rewrites: itself where none changed, else rebuilt (what
    `Node.with_args` does; inline here, as rebuilding is much of what the analyses spend)."""
    if not node.args:
        return node
    args = tuple([memo[a] for a in node.args])
    # Identity, not equality: a located operand's rewrite may be its equal interned twin, and then
    # the rebuilt node must drop the location too.
    if all(map(is_, args, node.args)):
        return node
    return Node(node.op, node.type, args, node.attr, node.loc)


def substitute(root: Node, values: dict[str, Node]) -> Node:
    """Replace each `$name` in values (params, fn arguments, lets) by its node."""
    if not values:
        return root

    def rule(node: Node) -> Node | None:
        if node.op is Op.REF and node.attr in values:
            return values[str(node.attr)]
        return None

    return rewrite(root, rule)
