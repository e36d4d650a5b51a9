"""The manual cannot drift from the code: every command it shows is checked against the commands.

README.md and docs/*.md are read; in their code blocks (not the ``python`` ones) and in their inline
code, every ``python -m byol_fast.X ...`` (also after ``torchrun``, ``srun`` or a ``$`` prompt) and
every ``make ...`` is checked:

- the flags of a command go through that command's own argparse parser, taken from the code by
  calling its ``main`` with ``parse_args``/``parse_known_args`` stopped before anything runs (so the
  test sees exactly the parser the command builds). Unknown options, wrong choices and stray
  arguments fail; a missing required argument fails in a code block only (inline code may show a
  command in part);
- ``train``, ``linear_eval`` and ``finetune`` pass what their parser leaves to the config as
  ``--section.key=value`` overrides: each key must be a field of the command's config dataclass
  (``byol_fast/config.py``), and each literal value and the ``--config`` recipe must load through
  ``load_config`` as the command would load them. Placeholders (``N``, ``PATH``, ``$lr``, ``<x>``)
  are checked for the key only; ``a|b`` checks each alternative;
- ``launch``: its own flags, and what follows ``--`` as a command line of the ``--entry`` it runs;
- ``make``: every target must be a target of the Makefile, every ``VAR=value`` a variable the
  Makefile uses; ``ARGS`` is checked as arguments of the command the target runs, and a ``*CONFIG``
  value must be a file;
- an inline flag on its own (``--reader.loader=dali``) must be an option of some command or a key of
  some config schema (with a value the schema accepts).

Every relative link must point at a file that exists, and every anchor at a heading of that page.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import shlex
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
from conftest import ROOT

from byol_fast.config import Config, FinetuneConfig, LinearConfig, load_config, split_overrides
from byol_fast.errors import ConfigError

COMMANDS = ("train", "linear_eval", "finetune", "export", "convert", "predict", "dense_probe", "data", "launch")
SCHEMAS = {"train": Config, "linear_eval": LinearConfig, "finetune": FinetuneConfig}
MAKE_RUNS = {"pretrain": "train", "linear-eval": "linear_eval", "finetune": "finetune"}  # target -> command of ARGS
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------- the commands' parsers


class _Built(BaseException):
    """Raised in place of parsing: carries the parser a command built (BaseException, so that no
    command's error handling catches it)."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


class _ArgError(Exception):
    pass


@cache
def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser ``python -m byol_fast.<command>`` builds, from its own ``main``."""
    module = importlib.import_module(f"byol_fast.{command}")

    def stop(self, args=None, namespace=None):
        raise _Built(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop):
        try:
            module.main([])
        except _Built as built:
            parser = built.parser
        else:
            raise AssertionError(f"byol_fast.{command}.main() parsed no arguments")
    for p in [parser, *subparsers(parser).values()]:
        p.allow_abbrev = False  # the manual spells options out
    return parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def parse(parser: argparse.ArgumentParser, args: list[str], known: bool):
    """The parser's own parse, with its errors raised instead of exiting."""
    def error(self, message):
        raise _ArgError(message)

    with mock.patch.object(argparse.ArgumentParser, "error", error):
        return parser.parse_known_args(args) if known else (parser.parse_args(args), [])


@cache
def option_names() -> set[str]:
    """Every option string of every command (subcommands included)."""
    names = set()
    for command in COMMANDS:
        top = parser_of(command)
        for p in [top, *subparsers(top).values()]:
            names |= {s for a in p._actions for s in a.option_strings}
    return names


def config_keys(schema: type, prefix: str = "") -> set[str]:
    """Dotted keys of a config dataclass, sections and leaves."""
    keys = set()
    for f in dataclasses.fields(schema):
        keys.add(prefix + f.name)
        default = getattr(schema(), f.name)
        if dataclasses.is_dataclass(default):
            keys |= config_keys(type(default), f"{prefix}{f.name}.")
    return keys


# ---------------------------------------------------------------------------- config overrides


def is_placeholder(value: str) -> bool:
    return (any(mark in value for mark in ("$", "<", "...", "{")) or re.fullmatch(r"[A-Z][A-Z_]*", value)
            is not None)


def check_overrides(schema: type, config_path: str | None, rest: list[str]) -> list[str]:
    """What is wrong with ``rest`` (``--key=value`` overrides) on top of ``config_path`` for ``schema``."""
    problems = []
    if config_path and is_placeholder(config_path):
        config_path = None
    if config_path and not (ROOT / config_path).is_file():
        return [f"--config {config_path}: no such file"]
    try:
        pairs = split_overrides(rest)  # (key, the value as written)
    except ConfigError as e:
        return [str(e)]
    known = config_keys(schema)
    for key, raw in pairs:
        if key not in known:
            problems.append(f"--{key}: not a key of {schema.__name__}")
            continue
        for value in raw.split("|"):  # a|b: each alternative
            if is_placeholder(value):
                continue
            try:
                load_config(ROOT / config_path if config_path else None, [f"--{key}={value}"], cls=schema)
            except ConfigError as e:
                problems.append(f"--{key}={value}: {e}")
    if config_path and not problems:
        try:
            load_config(ROOT / config_path, None, cls=schema)
        except ConfigError as e:
            problems.append(str(e))
    return problems


# ---------------------------------------------------------------------------- one command line


def check_command(command: str, args: list[str], complete: bool) -> list[str]:
    """What is wrong with ``python -m byol_fast.<command> <args>``; ``complete``: required arguments too."""
    if command not in COMMANDS:
        return [f"byol_fast.{command} is not a command ({', '.join(COMMANDS)})"]
    args = [a for a in args if a not in ("...", "[...]")]
    if command == "launch":
        ours, entry_args = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
        try:
            ns, _ = parse(parser_of("launch"), ours, known=False)
        except _ArgError as e:
            return [f"launch: {e}"]
        return check_command(ns.entry, entry_args, complete) if entry_args else []
    parser = parser_of(command)
    try:
        ns, rest = parse(parser, args, known=command in SCHEMAS)
    except _ArgError as e:
        if not complete and str(e).startswith("the following arguments are required"):
            return []
        return [f"{command}: {e}"]
    if command in SCHEMAS:
        return [f"{command}: {p}" for p in check_overrides(SCHEMAS[command], ns.config, rest)]
    return []


# ---------------------------------------------------------------------------- make


@cache
def makefile() -> tuple[set[str], set[str]]:
    """(targets, variables) of the Makefile: the variables it sets, reads or hands to the launcher."""
    text = (ROOT / "Makefile").read_text()
    targets = set()
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z][\w.-]*(?:\s+[A-Za-z][\w.-]*)*)\s*:(?!=)", line)
        if m and not line.startswith("\t"):
            targets |= set(m.group(1).split())
    variables = set(re.findall(r"^([A-Za-z_]\w*)\s*(?:\?|:|\+)?=", text, re.M))
    variables |= set(re.findall(r"\$\(([A-Za-z_]\w*)\)", text))
    for names in re.findall(r"\$\(foreach \w+,([\w ]+),", text):
        variables |= set(names.split())
    return targets - {".PHONY"}, variables


def check_make(args: list[str]) -> list[str]:
    targets, variables = makefile()
    problems = []
    for arg in args:
        if arg.startswith("-") or arg in ("...", "[...]"):
            continue
        if "=" in arg:
            name, value = arg.split("=", 1)
            if name not in variables:
                problems.append(f"make: {name} is not a variable of the Makefile")
            elif name.endswith("CONFIG") and not is_placeholder(value) and not (ROOT / value).is_file():
                problems.append(f"make: {arg}: no such file")
            elif name == "ARGS":
                runs = [MAKE_RUNS[t] for t in args if t in MAKE_RUNS]
                for command in runs:
                    problems += check_command(command, shlex.split(value), complete=False)
        elif arg not in targets:
            problems.append(f"make: no target {arg!r} in the Makefile")
    return problems


# ---------------------------------------------------------------------------- reading the manual


def command_lines(text: str):
    """(line number, shell text, in a code block?) of every command the page shows."""
    in_block, lang = False, ""
    pending, start = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            in_block, lang = (not in_block), fence.group(1)
            continue
        if in_block:
            if lang == "python":
                continue
            if not pending:
                start = n
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            yield start, pending, True
            pending = ""
        else:
            if line.count("`") % 2:
                yield n, "`" + line, False  # an inline span cut by a line break: reported, not read
                continue
            for span in re.findall(r"`([^`]+)`", line):
                yield n, span, False


def tokens(shell: str) -> list[str]:
    try:
        return shlex.split(shell, comments=True)
    except ValueError:
        return shell.split()


def cut(args: list[str]) -> list[str]:
    """Arguments up to the end of the shell command (``;``, ``&&``, a pipe, a redirection)."""
    out = []
    for a in args:
        if a in (";", "&&", "||", "|", ">", "2>&1"):
            break
        if a.endswith(";"):
            out.append(a[:-1])
            break
        out.append(a)
    return out


def check_line(shell: str, in_block: bool) -> list[str]:
    if not in_block and shell.startswith("`"):
        return ["inline code cut by a line break (keep each `...` on one line, so that it is checked)"]
    shell = shell.strip()
    if in_block and shell.startswith("#"):
        shell = shell[1:]  # a command shown as a comment (what `make -n` prints) is checked too
    toks = tokens(shell)
    if toks and toks[0] == "$":
        toks = toks[1:]
    for i, tok in enumerate(toks[:-1]):
        if tok == "-m" and toks[i + 1].startswith("byol_fast."):
            command = toks[i + 1].removeprefix("byol_fast.")
            if is_placeholder(command):  # python -m byol_fast.X
                return []
            return check_command(command, cut(toks[i + 2:]), complete=in_block)
    if toks and toks[0] == "make":
        return check_make(cut(toks[1:]))
    if not in_block and toks and toks[0].startswith("--"):
        return check_bare_flag(shell.strip())
    return []


# How the manual writes an override in general.
NOTATION = {"--key=value", "--section.key=value"}


def check_bare_flag(span: str) -> list[str]:
    """An option shown on its own must be some command's option or some schema's key."""
    if span in NOTATION:
        return []
    m = re.match(r"--([\w.-]+)(?:[= ](.*))?$", span)
    if not m:
        return []
    name, value = m.group(1), m.group(2)
    if "--" + name in option_names():
        return []
    schemas = [s for s in SCHEMAS.values() if name in config_keys(s)]
    if not schemas:
        return [f"--{name}: neither an option of a command nor a config key"]
    if value is None or "=" not in span:
        return []
    problems = [check_overrides(s, None, [span]) for s in schemas]
    return [] if any(not p for p in problems) else problems[0]


def doc_problems(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text() if text is None else text
    problems = []
    for n, shell, in_block in command_lines(text):
        problems += [f"{path.name}:{n}: {p}    [{shell.strip()}]" for p in check_line(shell, in_block)]
    return problems


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("command", COMMANDS)
def test_each_commands_parser_is_taken_from_its_code(command):
    parser = parser_of(command)
    assert parser.prog == f"python -m byol_fast.{command}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_in_the_manual_matches_the_code(page):
    assert not doc_problems(page), "\n".join(doc_problems(page))


def test_the_manual_shows_every_command():
    shown = "\n".join(p.read_text() for p in DOCS)
    for command in COMMANDS:
        assert f"python -m byol_fast.{command}" in shown, command
    targets, _ = makefile()
    for target in targets - {"help"}:
        assert f"make {target}" in shown, target


def test_a_made_up_flag_or_key_is_reported():
    fake = ("Run it:\n\n```bash\n"
            "python -m byol_fast.export --checkpoint a.pt --out b.pt --fp8\n"
            "python -m byol_fast.train --config config/demo.yaml --optim.lrr=0.3\n"
            "python -m byol_fast.train --reader.loader=pillow\n"
            "python -m byol_fast.linear_eval --checkpoint a.pt --data d --label_fraction=0.1\n"
            "python -m byol_fast.data shards a b --shard-sise 1GB\n"
            "python -m byol_fast.launch --gpus 8 -- --model.lss=pixpro\n"
            "python -m byol_fast.predict a.jpg\n"
            "make pretrain GPU=8\n"
            "make pretrian\n"
            "make pretrain ARGS=\"--seed=1 --outdir=x\"\n"
            "```\n\n"
            "Inline: `python -m byol_fast.convert x.pth --out y.pt --fromat auto`, `--monitor.knn_evry=5`, "
            "`--compile_mode=default|fastest`, `make linear-eval LINEAR_CONFIG=config/nope.yaml`.\n"
            "A span cut `python -m byol_fast.train\n--optim.lrr=1` by a line break.\n")
    problems = doc_problems(ROOT / "fake.md", fake)
    expected = ["--fp8", "optim.lrr", "pillow", "label_fraction", "--shard-sise", "model.lss",
                "required: --checkpoint", "GPU is not a variable", "no target 'pretrian'", "--outdir",
                "--fromat", "knn_evry", "fastest", "config/nope.yaml", "line break", "line break"]
    for word in expected:
        assert any(word in p for p in problems), (word, problems)
    assert len(problems) == len(expected), "\n".join(problems)


def test_good_lines_pass():
    good = ("```bash\n"
            "make -n pretrain GPUS=32 CONFIG=config/byol_r50_in1k_300ep.yaml DATA=/imagenet NNODES=4 NODE_RANK=0 \\\n"
            "    MASTER_ADDR=node0\n"
            "torchrun --nproc_per_node=8 -m byol_fast.train --config config/demo.yaml --optim.lr=0.3   # a comment\n"
            "for lr in 0.1 0.2; do python -m byol_fast.finetune --checkpoint a.pt --data d --lr=$lr; done\n"
            "```\n"
            "`python -m byol_fast.data index`, `--reader.decode=auto|cpu|gpu`, `--opset 18`, `--optim.accumulate=K`\n")
    assert not doc_problems(ROOT / "good.md", good)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    out = set()
    in_block = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block and (m := re.match(r"#+\s+(.*)", line)):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def broken_links(page: Path) -> list[str]:
    """Relative links of a page whose file, or whose anchor in a Markdown file, does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_exists(page):
    assert not broken_links(page)


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## The part\n\n[ok](#the-part) [ok](a.md#a-page) "
                                   "[bad](#no-part) [bad](b.md) [bad](a.md#nope) [web](https://example.com)\n")
    assert broken_links(tmp_path / "a.md") == ["#no-part", "b.md", "a.md#nope"]
