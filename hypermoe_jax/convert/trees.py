"""Nested parameter mappings as ``{path: leaf}`` (paths are tuples of strings) and back: the form
the converters match names and shapes in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Path = tuple[str, ...]


def flatten(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
    """``{path: leaf}`` of a nested mapping (a non-mapping ``tree`` is one leaf at ``prefix``)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, prefix + (str(k),)))
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """The nested dict of ``{path: leaf}``."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out
