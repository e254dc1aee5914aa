"""CEL parse trees (cel-python's grammar) compiled to Python closures.

cel-python parses; this module turns its tree into nested closures once, when a resource is
loaded, so evaluating an expression is a few plain Python calls over the event's parsed JSON,
with no per-event conversion of values. Why not cel-python's own runners: see
:mod:`eventhub.expressions`.

Each closure takes ``(scope, bound)``: the event (``scope.data``, ``scope.attribute(name)``) and
the values of the enclosing macros' variables, by position (names are resolved here, once).
Runtime errors are :class:`~eventhub.celruntime.EvalError`; ``&&``, ``||`` and the macros
absorb them as CEL says (``false && error`` is ``false``). What the compiler can tell is wrong
(unknown names and functions, wrong argument counts, a constant part that always fails, an
operand that can never be a bool) raises :class:`CompileError` with its line and column.

One method per rule of the grammar, on one class: that is why this module is longer than most.
The closures themselves are in :mod:`eventhub.celclosures`, the values and operators in
:mod:`eventhub.celruntime` and :mod:`eventhub.celconvert`, literals in
:mod:`eventhub.celliterals`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lark import Token, Tree

from eventhub import celclosures as cl
from eventhub import celliterals
from eventhub import celruntime as rt
from eventhub.celclosures import Fn as Fn  # re-exported: a compiled expression's type
from eventhub.celclosures import Node
from eventhub.celruntime import EvalError, Value

_ATTRIBUTE = re.compile(r"[a-z0-9]+")
_PASS_THROUGH = frozenset(
    {"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication"}
    | {"unary", "member", "primary", "paren_expr"}
)
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_BOOL_KINDS = (None, "bool")


class CompileError(Exception):
    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(message)
        self.message, self.line, self.column = message, line, column


@dataclass(frozen=True, slots=True)
class Program:
    fn: Fn
    kind: str | None
    uses_data: bool
    facts: tuple[tuple[str, str], ...]


def compile_tree(tree: Tree[Token], *, boolean: bool = True) -> Program:
    """The program of a parse tree; ``boolean``: refuse one that can never yield a bool."""
    compiler = _Compiler()
    root = compiler.node(tree)
    if boolean and root.kind not in _BOOL_KINDS:
        line, column = _position(tree)
        raise CompileError(f"yields {_a(root.kind)}, not a bool (true to match)", line, column)
    return Program(root.fn, root.kind, compiler.uses_data, root.facts)


def _position(item: Tree[Token] | Token) -> tuple[int, int]:
    if isinstance(item, Token):
        return item.line or 1, item.column or 1
    for child in item.children:
        return _position(child)
    return 1, 1


def _constant(value: Value, kind: str | None) -> Node:
    return Node(lambda _s, _b: value, kind, value)


def _unwrap(tree: Tree[Token]) -> Tree[Token]:
    while tree.data in _PASS_THROUGH and len(tree.children) == 1:
        child = tree.children[0]
        if not isinstance(child, Tree):
            break
        tree = child
    return tree


class _Compiler:
    def __init__(self) -> None:
        self.bound: list[str] = []  # the enclosing macros' variables, outermost first
        self.uses_data = False

    def node(self, tree: Tree[Token]) -> Node:
        tree = _unwrap(tree)
        handler: Callable[[Tree[Token]], Node] | None = getattr(self, f"_{tree.data}", None)
        if handler is None:
            line, column = _position(tree)
            raise CompileError(f"unsupported construct ({tree.data})", line, column)
        return handler(tree)

    def fail(self, where: Tree[Token] | Token, message: str) -> CompileError:
        line, column = _position(where)
        return CompileError(message, line, column)

    def fold(
        self, where: Tree[Token], node: Node, function: Callable[..., Value], *args: Node
    ) -> Node:
        """``node``, or its value when every operand is a constant; a constant that always
        fails is refused here rather than at every event."""
        if not all(arg.const is not cl.NOT_CONST for arg in args):
            return node
        try:
            value = function(*(arg.const for arg in args))
        except EvalError as exc:
            raise self.fail(where, str(exc)) from None
        return Node(lambda _s, _b: value, node.kind, value, node.facts)

    def boolean(self, node: Node, where: Tree[Token], operator_name: str) -> Node:
        if node.kind not in _BOOL_KINDS:
            raise self.fail(where, f"{operator_name} needs a bool, got {_a(node.kind)}")
        return node

    # ----------------------------------------------------------------------- logic

    def _expr(self, tree: Tree[Token]) -> Node:  # condition ? yes : no
        condition_tree, yes_tree, no_tree = map(_tree, tree.children)
        condition = self.boolean(self.node(condition_tree), condition_tree, "?:")
        yes, no = self.node(yes_tree), self.node(no_tree)
        if condition.const is not cl.NOT_CONST:
            return yes if condition.const else no
        test, if_yes, if_no = condition.fn, yes.fn, no.fn

        def choose(s: Any, b: tuple[Any, ...]) -> Value:
            chosen = test(s, b)
            if chosen is True:
                return if_yes(s, b)
            if chosen is False:
                return if_no(s, b)
            raise rt.no_overload("_?_:_", chosen)

        return Node(choose, yes.kind if yes.kind == no.kind else None)

    def _conditionaland(self, tree: Tree[Token]) -> Node:
        left, right = self._operands(tree, "&&")
        first, second = left.fn, right.fn

        def both(s: Any, b: tuple[Any, ...]) -> Value:
            try:
                a = first(s, b)
            except EvalError:
                if second(s, b) is False:  # false && error is false, either way round
                    return False
                raise
            if a is False:
                return False
            c = second(s, b)
            if a is True and type(c) is bool:
                return c
            if c is False:
                return False
            raise rt.no_overload("_&&_", a, c)

        return Node(both, "bool", facts=left.facts + right.facts)

    def _conditionalor(self, tree: Tree[Token]) -> Node:
        left, right = self._operands(tree, "||")
        first, second = left.fn, right.fn

        def either(s: Any, b: tuple[Any, ...]) -> Value:
            try:
                a = first(s, b)
            except EvalError:
                if second(s, b) is True:  # true || error is true, either way round
                    return True
                raise
            if a is True:
                return True
            c = second(s, b)
            if a is False and type(c) is bool:
                return c
            if c is True:
                return True
            raise rt.no_overload("_||_", a, c)

        return Node(either, "bool")

    def _operands(self, tree: Tree[Token], name: str) -> tuple[Node, Node]:
        left_tree, right_tree = map(_tree, tree.children)
        left = self.boolean(self.node(left_tree), left_tree, name)
        right = self.boolean(self.node(right_tree), right_tree, name)
        return left, right

    def _unary(self, tree: Tree[Token]) -> Node:
        sign, operand_tree = map(_tree, tree.children)
        operand = self.node(operand_tree)
        f = operand.fn
        if sign.data == "unary_not":
            self.boolean(operand, operand_tree, "!")
            not_ = rt.logical_not
            return self.fold(tree, Node(lambda s, b: not_(f(s, b)), "bool"), not_, operand)
        negate = rt.negate
        node = Node(lambda s, b: negate(f(s, b)), operand.kind or "arithmetic result")
        return self.fold(tree, node, negate, operand)

    # ----------------------------------------------------------------------- operators

    def _relation(self, tree: Tree[Token]) -> Node:
        op_tree, right_tree = map(_tree, tree.children)
        left_tree = _tree(op_tree.children[0])
        left, right = self.node(left_tree), self.node(right_tree)
        kind = op_tree.data
        if kind == "relation_in":
            node = Node(cl.contained_in(left, right), "bool")
            return self.fold(tree, node, rt.contained, left, right)
        if kind in ("relation_eq", "relation_ne"):
            facts = self._facts(left, right) if kind == "relation_eq" else ()
            node = Node(
                cl.equality(left, right, negated=kind == "relation_ne"), "bool", facts=facts
            )
            equal = rt.equals if kind == "relation_eq" else cl.not_equal
            return self.fold(tree, node, equal, left, right)
        fast, checked = cl.ORDER[kind]
        return self.fold(tree, Node(cl.ordering(left, right, fast, checked), "bool"), checked,
                         left, right)  # fmt: skip

    def _facts(self, left: Node, right: Node) -> tuple[tuple[str, str], ...]:
        """``type == 'x'``: a fact the router can index on (see filters.required_value)."""
        for name_node, value_node in ((left, right), (right, left)):
            name = getattr(name_node.fn, "attribute", None)
            if name is not None and type(value_node.const) is str:
                return ((name, value_node.const),)
        return ()

    def _addition(self, tree: Tree[Token]) -> Node:
        return self._arithmetic(tree, {"addition_add": rt.add, "addition_sub": rt.subtract})

    def _multiplication(self, tree: Tree[Token]) -> Node:
        return self._arithmetic(
            tree,
            {
                "multiplication_mul": rt.multiply,
                "multiplication_div": rt.divide,
                "multiplication_mod": rt.modulo,
            },
        )

    def _arithmetic(self, tree: Tree[Token], functions: dict[str, Callable[..., Value]]) -> Node:
        op_tree, right_tree = map(_tree, tree.children)
        left_tree = _tree(op_tree.children[0])
        left, right = self.node(left_tree), self.node(right_tree)
        function = functions[str(op_tree.data)]
        # Never a bool, whatever the operands: the top level and && can refuse it at once.
        kind = left.kind if left.kind == right.kind and left.kind else "arithmetic result"
        return self.fold(tree, Node(cl.call2(function, left, right), kind), function, left, right)

    # ----------------------------------------------------------------------- members

    def _member_dot(self, tree: Tree[Token]) -> Node:
        operand_tree, field = _tree(tree.children[0]), _token(tree.children[1])
        operand = self.node(operand_tree)
        name, f, select = str(field), operand.fn, rt.select
        if operand.const is cl.NOT_CONST and operand.fn is cl.data:

            def data_field(s: Any, _b: tuple[Any, ...]) -> Value:
                data = s.data
                if type(data) is dict and name in data:
                    return data[name]
                return select(data, name)

            return Node(data_field)

        def field_of(s: Any, b: tuple[Any, ...]) -> Value:
            value = f(s, b)
            if type(value) is dict and name in value:
                return value[name]
            return select(value, name)

        return self.fold(tree, Node(field_of), lambda v: select(v, name), operand)

    def _member_index(self, tree: Tree[Token]) -> Node:
        operand_tree, key_tree = map(_tree, tree.children)
        operand, key = self.node(operand_tree), self.node(key_tree)
        return self.fold(tree, Node(cl.call2(rt.index, operand, key)), rt.index, operand, key)

    def _member_object(self, tree: Tree[Token]) -> Node:
        raise self.fail(tree, "message construction is not supported")

    def _member_dot_arg(self, tree: Tree[Token]) -> Node:
        operand_tree, name_token = _tree(tree.children[0]), _token(tree.children[1])
        rest = tree.children[2:]
        args = _arguments(rest)
        name = str(name_token)
        if name in _MACROS:
            return self._macro(tree, name_token, operand_tree, args)
        receiver = self.node(operand_tree)
        function = cl.METHODS.get(name)
        if function is None:
            raise self.fail(name_token, f"unknown function {name!r}")
        return self._call(tree, name_token, function, [receiver, *map(self.node, args)])

    def _primary(self, tree: Tree[Token]) -> Node:
        return self.node(_tree(tree.children[0]))

    # ----------------------------------------------------------------------- names, calls

    def _ident(self, tree: Tree[Token]) -> Node:
        token = _token(tree.children[0])
        name = str(token)
        if name in self.bound:
            slot = len(self.bound) - 1 - self.bound[::-1].index(name)
            return Node(lambda _s, b: b[slot])
        return self._global(token)

    def _dot_ident(self, tree: Tree[Token]) -> Node:
        return self._global(_token(tree.children[0]))

    def _global(self, token: Token) -> Node:
        name = str(token)
        if name == "data":
            self.uses_data = True
            return Node(cl.data)
        if _ATTRIBUTE.fullmatch(name) is None:
            raise self.fail(
                token,
                f"unknown name {name!r}: use data, a context attribute "
                "(lowercase letters and digits) or a macro's variable",
            )

        def attribute(s: Any, _b: tuple[Any, ...]) -> Value:
            return s.attribute(name)

        attribute.attribute = name  # type: ignore[attr-defined]  # read by _facts
        return Node(attribute)

    def _ident_arg(self, tree: Tree[Token]) -> Node:
        name_token, rest = _token(tree.children[0]), tree.children[1:]
        args = _arguments(rest)
        name = str(name_token)
        if name == "has":
            return self._has(tree, name_token, args)
        function = cl.FUNCTIONS.get(name)
        if function is None:
            raise self.fail(name_token, f"unknown function {name!r}")
        return self._call(tree, name_token, function, list(map(self.node, args)))

    _dot_ident_arg = _ident_arg

    def _call(
        self, tree: Tree[Token], name: Token, function: cl.Function, args: list[Node]
    ) -> Node:
        if not function.arity[0] <= len(args) <= function.arity[1]:
            low, high = function.arity
            wanted = str(low) if low == high else f"{low} or {high}"
            raise self.fail(name, f"{name}() takes {wanted} arguments, got {len(args)}")
        if function.implementation is rt.matches and type(args[1].const) is str:
            try:
                node = Node(cl.matches_constant(args[0].fn, rt.regex(args[1].const)), "bool")
            except EvalError as exc:
                raise self.fail(tree, str(exc)) from None
            return self.fold(tree, node, function.implementation, *args)
        node = Node(cl.call_n(function.implementation, args), function.kind)
        return self.fold(tree, node, function.implementation, *args)

    def _has(self, tree: Tree[Token], name: Token, args: Sequence[Tree[Token]]) -> Node:
        target = _unwrap(args[0]) if len(args) == 1 else None
        if target is None or target.data != "member_dot":
            raise self.fail(name, "has() takes one field selection, as has(data.field)")
        operand_tree, field = _tree(target.children[0]), _token(target.children[1])
        operand, key, has_field = self.node(operand_tree), str(field), rt.has_field
        f = operand.fn
        node = Node(lambda s, b: has_field(f(s, b), key), "bool")
        return self.fold(tree, node, lambda v: has_field(v, key), operand)

    def _macro(
        self, tree: Tree[Token], name: Token, range_tree: Tree[Token], args: list[Tree[Token]]
    ) -> Node:
        macro = str(name)
        wanted = (2, 3) if macro == "map" else (2, 2)
        variable = _ident_name(args[0]) if args else None
        if variable is None or not wanted[0] <= len(args) <= wanted[1]:
            shape = (
                "(x, predicate)"
                if macro != "map"
                else "(x, expression) or (x, predicate, expression)"
            )
            raise self.fail(name, f"{macro}() takes {shape}, x a name")
        source = self.node(range_tree)
        self.bound.append(variable)
        try:
            bodies = [self.node(arg) for arg in args[1:]]
        finally:
            self.bound.pop()
        if macro != "map" or len(bodies) == 2:
            self.boolean(bodies[0], args[1], f"{macro}()")
        maker = cl.MACROS[macro]
        kind = "list" if macro in ("map", "filter") else "bool"
        return Node(maker(source.fn, *(body.fn for body in bodies)), kind)

    # ----------------------------------------------------------------------- literals

    def _literal(self, tree: Tree[Token]) -> Node:
        token = _token(tree.children[0])
        text, kind = str(token), token.type
        try:
            if kind == "INT_LIT":
                return _constant(rt.checked_int(celliterals.integer(text)), "int")
            if kind == "UINT_LIT":
                value = celliterals.integer(text[:-1])
                if not 0 <= value <= rt.UINT_MAX:
                    raise EvalError("uint literal out of range")
                return _constant(value, "int")
            if kind == "FLOAT_LIT":
                return _constant(float(text), "double")
            if kind in ("STRING_LIT", "MLSTRING_LIT"):
                return _constant(celliterals.unquote(text), "string")
            if kind == "BYTES_LIT":
                return _constant(celliterals.unquote_bytes(text[1:]), "bytes")
            if kind == "BOOL_LIT":
                return _constant(text == "true", "bool")
            return _constant(None, "null")
        except EvalError as exc:
            raise self.fail(token, str(exc)) from None
        except ValueError as exc:
            raise self.fail(token, f"invalid literal: {exc}") from None

    def _list_lit(self, tree: Tree[Token]) -> Node:
        items = [self.node(item) for item in _arguments(tree.children)]
        if all(item.const is not cl.NOT_CONST for item in items):
            return _constant(tuple(item.const for item in items), "list")
        fns = [item.fn for item in items]
        return Node(lambda s, b: [f(s, b) for f in fns], "list")

    def _map_lit(self, tree: Tree[Token]) -> Node:
        inits = _tree(tree.children[0]).children if tree.children else []
        nodes = [self.node(item) for item in inits if isinstance(item, Tree)]
        pairs = list(zip(nodes[::2], nodes[1::2], strict=True))
        fns = [(k.fn, v.fn) for k, v in pairs]
        new_map = rt.new_map
        node = Node(lambda s, b: new_map([(k(s, b), v(s, b)) for k, v in fns]), "map")
        if all(k.const is not cl.NOT_CONST and v.const is not cl.NOT_CONST for k, v in pairs):
            return self.fold(
                tree, node, lambda *kv: new_map(list(zip(kv[::2], kv[1::2], strict=True))), *nodes
            )
        return node


# --------------------------------------------------------------------------- helpers


def _a(kind: str | None) -> str:
    return f"an {kind}" if (kind or "x")[0] in "aeiou" else f"a {kind}"


def _tree(item: object) -> Tree[Token]:
    if isinstance(item, Tree):
        return item
    raise TypeError(f"unexpected token in the parse tree: {item!r}")


def _token(item: object) -> Token:
    if isinstance(item, Token):
        return item
    raise TypeError(f"unexpected subtree in the parse tree: {item!r}")


def _arguments(children: Sequence[Any]) -> list[Tree[Token]]:
    """The expressions of an optional ``exprlist`` child."""
    for child in children:
        if isinstance(child, Tree) and child.data == "exprlist":
            return [c for c in child.children if isinstance(c, Tree)]
    return []


def _ident_name(tree: Tree[Token]) -> str | None:
    tree = _unwrap(tree)
    if tree.data == "ident" and isinstance(tree.children[0], Token):
        return str(tree.children[0])
    return None
