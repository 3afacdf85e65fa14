"""Reading a YAML file that nobody vouches for: bounded in bytes, nesting and expanded values.

A recipe is a page of YAML; a file far bigger, nested thousands deep (PyYAML's scanner takes time quadratic in
the depth) or whose aliases expand to millions of values ("billion laughs") is refused in one line before it
can use much time or memory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from keiryo.errors import ConfigError

MAX_BYTES = 1 << 20  # a recipe is a page of YAML; 1 MiB is far more than any needs
MAX_NODES = 10_000  # YAML values after expanding aliases: stops "billion laughs" files
MAX_DEPTH = 64  # nested [ and {: PyYAML's scanner takes time quadratic in this depth


def where(path: str, line: int | None) -> str:
    """How messages name a place in a recipe: "recipe 'r.yaml' line 3"."""
    return f"recipe '{path}'" + (f" line {line}" if line else "")


def read_yaml(path: str, list_key: str = "steps") -> tuple[Any, dict[int, int]]:
    """(the data, the line of each item of its top-level `list_key`) of a YAML file, refusing huge files and
    alias bombs first."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"recipe '{path}' does not exist")
    size = file.stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(f"recipe '{path}' is {size} bytes; a recipe may have at most {MAX_BYTES}")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe '{path}' is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"recipe '{path}' cannot be read: {exc.strerror or exc}") from exc
    _check_depth(text, path)
    loader = yaml.SafeLoader(text)  # the pure-Python loader: libyaml's recursion can crash the process
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _count_nodes(node, path)
        return loader.construct_document(node), _item_lines(node, list_key)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigError(f"{where(path, line)}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    except RecursionError as exc:
        raise ConfigError(f"recipe '{path}': its YAML is nested too deeply") from exc
    finally:
        loader.dispose()


def _check_depth(text: str, path: str) -> None:
    """Refuse brackets nested deeper than MAX_DEPTH (counting those in strings too: a real recipe is
    nowhere near), before the YAML scanner spends minutes on them."""
    depth = 0
    for char in re.sub(r"[^\[\]{}]", "", text):
        depth = depth + 1 if char in "[{" else max(depth - 1, 0)
        if depth > MAX_DEPTH:
            raise ConfigError(f"recipe '{path}': its YAML nests [ and {{ more than {MAX_DEPTH} deep")


def _count_nodes(root: yaml.Node, path: str) -> int:
    """The number of YAML values once every alias is expanded; refuses more than MAX_NODES and
    aliases that contain themselves. Each node is counted once, so this takes time in the file's size."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{where(path, node.start_mark.line + 1)}: a YAML alias contains itself")
        open_nodes.add(key)
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        open_nodes.discard(key)
        if total > MAX_NODES:
            raise ConfigError(
                f"recipe '{path}': its YAML expands to more than {MAX_NODES} values "
                "(aliases repeated inside aliases?); write the recipe out plainly"
            )
        sizes[key] = total
        return total

    return size(root)


def _item_lines(node: yaml.Node | None, list_key: str) -> dict[int, int]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    for key, value in node.value:
        if key.value == list_key and isinstance(value, yaml.SequenceNode):
            return {i: item.start_mark.line + 1 for i, item in enumerate(value.value)}
    return {}
