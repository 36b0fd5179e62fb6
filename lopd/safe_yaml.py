"""YAML from users (recipes, ``--set`` values): safe tags only, and bounded in size.

PyYAML's ``safe_load`` shares aliased nodes, so a few hundred bytes of nested aliases (the
"billion laughs" pattern) load instantly but expand to ~10^9 elements the first time anything
walks the result (validation, hashing, printing). :func:`load_yaml` counts the nodes a document
expands to, counting an aliased node once per reference, and refuses documents over
:data:`MAX_NODES`, recursive aliases, nesting too deep to compose, and integers too long to convert.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_NODES = 100_000
"""Most nodes a document may expand to, aliases expanded (a real recipe has a few hundred)."""


class YamlLimitError(yaml.YAMLError):
    """A document that is well-formed YAML but too large (or recursive) to load."""

    def __init__(self, problem: str, mark: yaml.Mark | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def expanded_size(root: yaml.Node, limit: int = MAX_NODES) -> int:
    """Nodes of ``root`` with every alias expanded; raises :class:`YamlLimitError` past ``limit``
    or on a recursive alias. Linear in the composed graph (shared nodes are sized once)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > limit:
                raise YamlLimitError(f"aliases expand to more than {limit} nodes", node.start_mark)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YamlLimitError("recursive alias (a node contains itself)", node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: fast, and it caps nesting depth


class BoundedLoader(_Base):
    """The safe loader (libyaml's when present) whose integers that Python cannot convert are YAML errors."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise YamlLimitError(f"integer too long ({len(str(node.value))} characters)", node.start_mark) from None


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """Parse one YAML document like ``yaml.safe_load``, refusing it when its nodes, aliases
    expanded, exceed :data:`MAX_NODES` (checked on the composed graph, before any expansion).

    Raises ``yaml.YAMLError`` (a :class:`YamlLimitError` for the limits) with a mark where known.
    """
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    except RecursionError:
        raise YamlLimitError("nested too deeply") from None
    finally:
        loader.dispose()
