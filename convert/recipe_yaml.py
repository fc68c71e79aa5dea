"""Reading a recipe file as YAML, defensively: it may be wrong, or written to hurt.

A recipe is a small hand-written UTF-8 file. Anything else is refused with one line
before it can cost time or memory: an oversized file (checked before reading), another
encoding, duplicate keys (YAML lets the last one silently win, so a second `components:`
block would quietly replace the first), and aliases that expand exponentially (a
"billion laughs" recipe is a few hundred bytes but gigabytes once anything walks it).
The file is parsed once; the node tree is kept for line numbers in later messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from convert.errors import RecipeError

#: Largest recipe file read; real recipes are a few KiB.
MAX_RECIPE_BYTES = 1 << 20
#: Most YAML nodes a recipe may hold once aliases are expanded (a full recipe has a few hundred).
MAX_EXPANDED_NODES = 20_000
#: Deepest nesting of YAML collections (a recipe needs about 6).
MAX_DEPTH = 32

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _TooLarge(yaml.YAMLError):
    """Raised while composing, so a huge recipe stops after MAX_EXPANDED_NODES nodes, not at its end."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that stops past MAX_DEPTH (PyYAML's composer recurses per level) or MAX_EXPANDED_NODES nodes.

    The pure-Python loader on purpose: these hooks need its composer, and a recipe is small.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:  # type: ignore[override]
        self._depth += 1
        self._nodes += 1
        try:
            line = self.peek_event().start_mark.line + 1
            if self._depth > MAX_DEPTH:
                raise _TooLarge(f"line {line}: nested more than {MAX_DEPTH} levels deep; a recipe is a few levels of keys")
            if self._nodes > MAX_EXPANDED_NODES:
                raise _TooLarge(f"line {line}: more than {MAX_EXPANDED_NODES} YAML values; a recipe holds a few hundred")
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


def read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """The recipe's data and its node tree (for line numbers); every problem is a one-line RecipeError."""
    text = read_text(path)
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        check_tree(root, path)
        return loader.construct_document(root), root
    except _TooLarge as e:
        raise RecipeError(str(e), path=path) from None
    except yaml.YAMLError as e:
        raise RecipeError(describe_yaml_error(e, text), path=path) from e
    finally:
        loader.dispose()


def read_text(path: Path) -> str:
    """The file as text: size capped before reading, UTF-8 only (a UTF-8 BOM is tolerated)."""
    try:
        kind = "dir" if path.is_dir() else "file" if path.is_file() else "other" if path.exists() else None
    except OSError as e:  # a name too long for the file system (is_dir only swallows "not found")
        shown = str(path) if len(str(path)) <= 200 else f"{str(path)[:200]}... ({len(str(path))} characters)"
        raise RecipeError(f"{shown}: cannot read the recipe ({e.strerror or type(e).__name__})",
                          hint="check the name or pass a path to a .yaml file") from None
    if kind == "dir":
        raise RecipeError("is a directory, not a recipe file", path=path, hint="pass a .yaml file or a recipe name")
    if kind == "other":
        raise RecipeError("is not a regular file", path=path, hint="pass a .yaml file or a recipe name")
    if kind is None:
        raise RecipeError("recipe file not found", path=path, hint="check the name or pass a path to a .yaml file")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"is {_mib(size)}; a recipe is at most {_mib(MAX_RECIPE_BYTES)}", path=path)
        with path.open("rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"cannot read the recipe ({e.strerror or type(e).__name__})", path=path) from None
    if len(raw) > MAX_RECIPE_BYTES:  # grew since stat
        raise RecipeError(f"is larger than {_mib(MAX_RECIPE_BYTES)}, the most a recipe may be", path=path)
    return decode(raw, path)


def decode(raw: bytes, path: Path) -> str:
    fix = "save it as UTF-8"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipeError("is UTF-16 text, not UTF-8", path=path, hint=fix)
    if b"\x00" in raw:
        offset = raw.index(b"\x00")
        raise RecipeError(f"holds a NUL byte at offset {offset}: not a UTF-8 text file", path=path, hint=fix)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise RecipeError(f"line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})",
                          path=path, hint=fix) from None


def check_tree(root: yaml.Node, path: Path) -> None:
    """Refuse alias bombs, recursive aliases and duplicate keys, walking each node once.

    Shared (aliased) nodes are counted with their full expanded size but visited once,
    so this is linear in the file even when the expansion is not.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_EXPANDED_NODES:
                raise RecipeError(
                    f"line {node.start_mark.line + 1}: aliases expand this recipe past {MAX_EXPANDED_NODES} YAML nodes",
                    path=path, hint="write the values out instead of nesting aliases",
                )
            continue
        if key in sizes:
            continue
        if isinstance(node, yaml.MappingNode):
            _check_duplicate_keys(node, path)
        open_nodes.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise RecipeError(f"line {node.start_mark.line + 1}: an alias refers to a node that contains it",
                                  path=path, hint="recursive YAML aliases are not allowed in a recipe")
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_duplicate_keys(node: yaml.MappingNode, path: Path) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key, _value in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
            continue
        line = key.start_mark.line + 1
        first = seen.get((key.tag, key.value))
        if first is not None:
            where = f"lines {first} and {line}" if first != line else f"line {line} (twice)"
            raise RecipeError(f"duplicate key '{short(key.value)}' at {where}", path=path,
                              hint="YAML would keep only the last one; merge them into one")
        seen[(key.tag, key.value)] = line


def describe_yaml_error(error: yaml.YAMLError, text: str) -> str:
    """One line, whatever PyYAML's message looks like (some span several lines)."""
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        return f"line {line}: not valid YAML (character #x{error.character:04x} is not allowed)"
    mark = getattr(error, "problem_mark", None)
    at = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    detail = " ".join(f"{context or ''} {problem}".split())
    return f"{at}not valid YAML ({short(detail, 200)})"


def short(text: object, limit: int = 60) -> str:
    """A user value quoted in a message, cut so a hostile value cannot flood the terminal."""
    value = str(text)
    value = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value[: limit + 1])
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.3g} MiB" if size >= (1 << 20) else f"{size} bytes"
