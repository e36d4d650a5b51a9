"""Reading config YAML (recipe files and ``--key=value`` override values) with bounded cost.

A config is a small tree of sections, numbers, strings and short lists, so anything beyond that is
refused before it is built, each time with one line naming the file (or the override) and the line:

- anchors and aliases (``&name``, ``*name``): a config never needs them, and nested aliases expand a
  few hundred bytes into gigabytes ("billion laughs");
- more than :data:`MAX_BYTES` of text, or nodes nested deeper than :data:`MAX_DEPTH` (the composer
  recurses once per level: thousands of ``[`` would end in a RecursionError);
- bytes that are not UTF-8 (the message gives the offset of the first bad byte);
- anything PyYAML itself refuses, and scalars its safe constructors cannot turn into values (a
  timestamp with month 13, an integer of more digits than Python converts).

Override values (``--section.key=value``, :func:`parse_overrides`) go through the same reader as
files. :func:`quote` and :func:`shorten` cut a user's value for an error message. This module
imports only ``byol_fast.errors``, so every layer may read config text through it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent

from byol_fast.errors import ConfigError

MAX_BYTES = 1 << 20  # a recipe is a few kilobytes
MAX_DEPTH = 32  # a recipe is five nodes deep at most: the file, data, view1, crop_area, a number
QUOTE_LIMIT = 200  # characters of a user's value an error message shows


def shorten(text: str, limit: int = QUOTE_LIMIT, size: str = "") -> str:
    """``text`` cut to ``limit`` characters, then an ellipsis and how long it was (``size``, or
    its length in characters), so that an error message stays one readable line."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({size or f'{len(text):,} characters'})"


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, shortened as :func:`shorten` does."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python writes out
        text = f"<{type(value).__name__}>"
    if isinstance(value, str):
        size = f"{len(value):,} characters"
    elif isinstance(value, (list, tuple, dict)):
        size = f"{len(value):,} items"
    else:
        size = f"{len(text):,} characters written out"
    return shorten(text, limit, size)


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors, aliases and deep nesting while it composes the node
    tree (before any value is built), and turning a constructor's ValueError into a YAML error."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent) or (isinstance(event, (ScalarEvent, CollectionStartEvent))
                                             and event.anchor is not None):
            what = "alias *" if isinstance(event, AliasEvent) else "anchor &"
            raise ComposerError(None, None, f"YAML anchors and aliases are not allowed in a config ({what}"
                                f"{event.anchor[:40]}): write each value out", event.start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        # a well-formed scalar that has no value: a date in a 13th month, an int of 5000 digits
        except (ValueError, OverflowError) as e:
            raise ConstructorError(None, None, f"cannot read {node.tag.rpartition(':')[2]} "
                                   f"{quote(getattr(node, 'value', ''), 30)}: {shorten(str(e), 60)}",
                                   node.start_mark) from None


def _one_line(e: yaml.YAMLError) -> str:
    """A YAML error as one line: where (line, column) and what, without PyYAML's quoted snippet."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "; ".join(str(p) for p in (e.context, e.problem) if p)
        return where + what
    if isinstance(e, yaml.reader.ReaderError):
        code = e.character if isinstance(e.character, int) else ord(e.character)
        return f"character {e.position + 1} (#x{code:04x}): {e.reason}"
    return " ".join(str(e).split())


def load_text(text: str, source: str) -> Any:
    """The value of one YAML document; ConfigError in one line naming ``source`` otherwise."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(f"{source}: more than {MAX_BYTES:,} bytes of YAML; a config is a few kilobytes")
    try:
        loader = BoundedLoader(text)  # checks every character is printable first
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid config YAML: {shorten(_one_line(e))}") from None


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping of sections: at most MAX_BYTES of UTF-8, read by :func:`load_text`."""
    path, name = Path(path), shorten(str(path))
    try:
        if not path.is_file():  # missing, or a folder, pipe or device (a pipe would block the read)
            raise ConfigError(f"config file not found: {name}")
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:  # unreadable, or a name longer than the system takes
        raise ConfigError(f"{name}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{name}: larger than {MAX_BYTES:,} bytes; a config is a few kilobytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    data = load_text(text, name)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of config sections at the top level")
    return data


def split_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``['--optim.lr=0.3', '--epochs', '5']`` -> ``[('optim.lr', '0.3'), ('epochs', '5')]``: each
    key with its value as written (``--key=value`` or ``--key value``)."""
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {quote(arg)}: overrides look like --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, raw = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"{quote(arg)}: missing a value")
        pairs.append((key, raw))
        i += 1
    return pairs


def parse_overrides(args: list[str]) -> dict:
    """``['--optim.lr=0.3', '--epochs', '5']`` -> ``{'optim': {'lr': 0.3}, 'epochs': 5}``."""
    out: dict = {}
    for key, raw in split_overrides(args):
        name = f"--{key}" if len(key) <= 80 else quote(f"--{key}", 80)  # the flag, shortened if need be
        value = load_text(raw, name) if raw != "" else ""  # the same bounded reader as config files
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {quote(p, 80)} is given both as a value and as a section")
        node[parts[-1]] = value
    return out
