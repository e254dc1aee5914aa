"""YAML as eventhub reads it: PyYAML's safe loader, except that a mapping may not set a key twice.

PyYAML keeps the last value of a duplicate key without a word, so a resource written with two
``url:`` lines, or a settings file with two ``port:`` lines, would silently lose one. YAML itself
says mapping keys are unique, and kubectl refuses such a document; so does eventhub, everywhere it
reads YAML: ``eventhub apply``, a resource PUT as YAML, ``eventhub dev``'s examples and the
settings file.

Keys are compared as loaded, so ``1`` and ``0x1``, or ``true`` and ``yes``, are the same key. A
merge key (``<<: *defaults``) is not a duplicate of the keys it brings in: overriding those is what
it is for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKey(ConstructorError):
    """A mapping sets ``path`` twice. ``document`` counts from 1 in the stream; ``root`` is that
    document's node, so that a caller can name what the document declares."""

    def __init__(self, path: str, first: yaml.Mark, again: yaml.Mark, document: int, root: Node):
        self.path = path
        self.first_line = first.line + 1
        self.line = again.line + 1
        self.document = document
        self.root = root
        super().__init__(None, None, self.message, again)

    @property
    def message(self) -> str:
        return f"duplicate key (set at lines {self.first_line} and {self.line})"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKey` for a key set twice in a mapping."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._document = 0

    def construct_document(self, node: Node) -> Any:
        self._document += 1
        self._check_unique(node)
        return super().construct_document(node)

    def _check_unique(self, root: Node) -> None:
        visited: set[int] = set()  # an alias repeats a node: check it once (no "billion laughs")
        stack: list[tuple[Node, str]] = [(root, "")]
        while stack:
            node, path = stack.pop()
            if id(node) in visited:
                continue
            visited.add(id(node))
            children: list[tuple[Node, str]] = []
            if isinstance(node, MappingNode):
                seen: dict[object, yaml.Mark] = {}
                for key_node, value_node in node.value:
                    if key_node.tag == _MERGE:
                        children.append((value_node, path))
                        continue
                    key = self._key(key_node)
                    child = f"{path}.{key}" if path else str(key)
                    if key is not None and key in seen:
                        raise DuplicateKey(
                            child, seen[key], key_node.start_mark, self._document, root
                        )
                    if key is not None:
                        seen[key] = key_node.start_mark
                    children.append((value_node, child))
            elif isinstance(node, SequenceNode):
                children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            stack.extend(reversed(children))  # depth first, in document order

    def _key(self, node: Node) -> object:
        """The key as loaded, or None for one that cannot be compared (not a scalar)."""
        if not isinstance(node, ScalarNode):
            return None
        key = self.construct_object(node)
        try:
            hash(key)
        except TypeError:
            return None
        return key


def load(text: str | bytes) -> Any:
    """The single document in ``text``; raises :class:`DuplicateKey` or another YAMLError."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader


def load_all(text: str | bytes) -> Iterator[Any]:
    """Each document in ``text`` in order (an empty one as None)."""
    yield from yaml.load_all(text, Loader=Loader)


def scalar_at(node: Node, *keys: str) -> str | None:
    """The scalar under ``keys`` in a document's node (the first one where a key repeats), e.g.
    ``scalar_at(root, "metadata", "name")``; None when there is none."""
    for key in keys:
        if not isinstance(node, MappingNode):
            return None
        found = next(
            (v for k, v in node.value if isinstance(k, ScalarNode) and k.value == key), None
        )
        if found is None:
            return None
        node = found
    return node.value if isinstance(node, ScalarNode) else None
