"""Every ``advpipe ...`` command in README.md, docs/ and benchmarks/README.md is checked against the live CLI.

What is collected: each line of a ```bash / ```sh / ```console / unlabelled code block whose
command (after ``$ ``, split at ``&&`` and ``;``, ``\\`` continuations joined, ``# comments``
dropped) is ``advpipe ...``, ``python -m advpipe ...`` or ``torchrun ... -m advpipe ...``, and
every inline code span that starts with ``advpipe `` (it may wrap across lines).

What is checked, against ``typer.main.get_command(app)`` (so flags added or renamed later are
seen): the (sub)command exists; every flag exists for that command; every value parses with the
option's own type (an ``int`` option gets an integer); a flag that takes no value gets none; there
are no more positional arguments than the command takes. In a code block the command must be
complete: a (sub)command, a value for each option, and every required option and argument.
Inline spans may name a flag without its value (```advpipe evaluate --attack```).

The synopsis notation the docs use: ``[...]`` is optional, ``A|B`` lists alternatives (each is
checked: ``--encoder linear|unet``, ``masks info|verify``), ``...`` repeats; a value that starts
with an UPPERCASE word (``N``, ``STORE``, ``RUN/best.pt``) or holds a ``$VARIABLE`` is a
placeholder, and is not parsed.
"""

from __future__ import annotations

import difflib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main

from advpipe.cli import app
from advpipe.commands.errors_cli import click_errors

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "README.md"]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "zsh"}


@dataclass(frozen=True)
class DocCommand:
    """One ``advpipe`` command line found in a document."""

    where: str  # file:line
    text: str  # from ``advpipe`` on, continuations joined
    inline: bool  # an inline code span (may be a fragment) rather than a code-block line


def _strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` that starts a word; ``URL#sha256=...`` is kept)."""
    return re.sub(r"(^|\s)#.*$", "", line)


def _advpipe_part(command: str) -> str | None:
    """The ``advpipe ...`` part of a shell command, or None when it runs something else."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    if tokens[:1] == ["$"]:
        tokens = tokens[1:]
    for i, tok in enumerate(tokens):
        if tok == "advpipe" and (i == 0 or tokens[i - 1] == "-m"):
            return shlex.join(tokens[i:])
    return None


def block_commands(where: str, first_line: int, lines: list[str]) -> list[DocCommand]:
    """The advpipe commands of one shell code block."""
    found, i = [], 0
    while i < len(lines):
        start, text = i, _strip_comment(lines[i]).rstrip()
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + _strip_comment(lines[i]).strip()
        i += 1
        for part in re.split(r"&&|;", text):
            if part.strip() and (cmd := _advpipe_part(part.strip())) is not None:
                found.append(DocCommand(f"{where}:{first_line + start}", cmd, inline=False))
    return found


def doc_commands(path: Path, where: str | None = None) -> list[DocCommand]:
    """Every advpipe command in the markdown file ``path``: code-block lines and inline code spans."""
    where = where or str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    found: list[DocCommand] = []
    prose: list[tuple[int, str]] = []  # (line number, text) outside fences, for the inline spans
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w-]*)", lines[i])
        if not fence:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence.group(1)):
            end += 1
        if fence.group(2).lower() in SHELL_BLOCKS:
            found += block_commands(where, i + 2, lines[i + 1:end])
        i = end + 1
    text = "\n".join(t for _, t in prose)
    starts = [n for n, t in prose for _ in range(len(t) + 1)]  # character offset -> line number
    for span in re.finditer(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, flags=re.S):
        body = " ".join(span.group(2).split())
        if body.startswith("advpipe "):
            found.append(DocCommand(f"{where}:{starts[span.start()]}", body, inline=True))
    return found


def all_doc_commands() -> list[DocCommand]:
    """The advpipe commands of every checked document."""
    return [c for path in DOC_FILES if path.is_file() for c in doc_commands(path)]


def _is_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1 and not re.match(r"-\.?\d", token)


def _is_placeholder(value: str) -> bool:
    """An illustrative value: ``N``, ``STORE``, ``RUN/best.pt``, ``$S``, ``3f1c...`` (not parsed)."""
    return "$" in value or "..." in value or bool(re.match(r"[A-Z][A-Z0-9_]*(\W|$)", value))


def _names(command) -> dict[str, object]:
    return {opt: p for p in command.params for opt in p.opts + p.secondary_opts if opt.startswith("-")}


def _takes_no_value(param) -> bool:
    return bool(getattr(param, "is_flag", False) or getattr(param, "count", False))


def check_command(text: str, inline: bool = False, root=None) -> list[str]:
    """What is wrong with the command line ``text`` (``advpipe ...``) for the CLI; empty when it is fine."""
    root = root if root is not None else CLI
    tokens = [t.strip("[]") for t in shlex.split(text)][1:]  # without "advpipe"
    tokens = [t for t in tokens if t and t != "|" and t != "..."]
    return _check(root, "advpipe", tokens, inline)


def _check(command, path: str, tokens: list[str], inline: bool) -> list[str]:
    problems: list[str] = []
    options = _names(command)
    seen: set[str] = set()
    positionals: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if _is_option(tok):
            name, has_value, value = tok.partition("=")
            param = options.get(name)
            i += 1
            if param is None:
                close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
                problems.append(f"{path}: no option {name}" + (f" (closest: {close[0]})" if close else ""))
                continue
            seen.add(param.name)
            if _takes_no_value(param):
                if has_value:
                    problems.append(f"{path}: {name} takes no value, got {value!r}")
                continue
            if not has_value:
                if i < len(tokens) and not _is_option(tokens[i]):
                    value, i = tokens[i], i + 1
                else:
                    if not inline:
                        problems.append(f"{path}: {name} needs a value")
                    continue
            problems += _check_value(command, path, param, name, value)
        elif hasattr(command, "commands") and not positionals:
            subproblems = []
            for alternative in tok.split("|"):
                sub = command.commands.get(alternative)
                if sub is None:
                    close = difflib.get_close_matches(alternative, list(command.commands), n=1, cutoff=0.0)
                    subproblems.append(f"{path}: no command {alternative!r}" + (f" (closest: {close[0]})" if close else ""))
                else:
                    subproblems += _check(sub, f"{path} {alternative}", tokens[i + 1:], inline)
            return problems + subproblems
        else:
            positionals.append(tok)
            i += 1
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    if hasattr(command, "commands") and not inline:
        problems.append(f"{path}: needs a command ({', '.join(command.commands)})")
    unlimited = any(p.nargs < 0 for p in arguments)
    if not unlimited and len(positionals) > sum(p.nargs for p in arguments):
        problems.append(f"{path}: takes {sum(p.nargs for p in arguments)} argument(s), got {positionals}")
    for param, value in zip(arguments, positionals):
        if param.nargs == 1:
            problems += _check_value(command, path, param, param.name, value)
    if not inline:
        for param in command.params:
            if param.required and param.param_type_name == "option" and param.name not in seen:
                problems.append(f"{path}: the required option {param.opts[0]} is missing")
        needed = sum(max(p.nargs, 1) for p in arguments if p.required)
        if len(positionals) < needed and not unlimited:
            problems.append(f"{path}: needs {needed} argument(s), got {positionals}")
    return problems


def _check_value(command, path: str, param, name: str, value: str) -> list[str]:
    """Parse ``value`` (each ``|`` alternative) with the parameter's own type."""
    problems = []
    for alternative in value.split("|"):
        if _is_placeholder(alternative):
            continue
        ctx = command.context_class(command, info_name=path)
        try:
            param.process_value(ctx, (alternative,) if param.multiple or param.nargs != 1 else alternative)
        except click_errors.UsageError as exc:
            problems.append(f"{path}: {name} {alternative!r}: {' '.join(exc.format_message().split())}")
    return problems


CLI = typer.main.get_command(app)  # the live command tree: flags added or renamed later are seen
COMMANDS = all_doc_commands()


def test_the_docs_hold_commands_of_every_kind():
    """The collector sees code-block lines, joined continuations, inline spans and torchrun lines."""
    by_file = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/evaluation.md", "docs/precompute.md", "docs/sharing.md"} <= by_file
    assert len([c for c in COMMANDS if not c.inline]) >= 50 and len([c for c in COMMANDS if c.inline]) >= 30
    texts = [c.text for c in COMMANDS]
    # a `\` continuation is part of its command (docs/evaluation.md: --severities on the second line)
    assert any("--corruptions gaussian-noise,jpeg,rotation --severities 1,3,5" in t for t in texts)
    assert any(t.startswith("advpipe train --data folder") for t in texts)  # after `torchrun ... \` `-m advpipe`
    commands = {t.split()[1] for t in texts}
    assert {"train", "evaluate", "precompute-masks", "masks", "report", "study", "demo", "info"} <= commands


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_doc_command_matches_the_cli(command: DocCommand):
    problems = check_command(command.text, command.inline)
    assert not problems, f"{command.where}: {command.text}\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "text, inline, expected",
    [
        ("advpipe train --epoch 3", False, "no option --epoch (closest: --epochs)"),
        ("advpipe train --epochs abc", False, "--epochs 'abc'"),
        ("advpipe train --limit 1.5", False, "--limit '1.5'"),
        ("advpipe trian --epochs 3", False, "no command 'trian' (closest: train)"),
        ("advpipe masks verfy STORE", False, "no command 'verfy'"),
        ("advpipe masks info|verfy STORE", False, "no command 'verfy'"),
        ("advpipe evaluate --limit 5", False, "the required option --checkpoint is missing"),
        ("advpipe train --resume=yes", False, "--resume takes no value"),
        ("advpipe train --epochs", False, "--epochs needs a value"),
        ("advpipe masks", False, "needs a command"),
        ("advpipe masks info a b c", False, "argument(s), got"),
        ("advpipe train --precision auto|fp32 --epochs 1|x", False, "--epochs 'x'"),
    ],
)
def test_the_checker_catches_broken_commands(text, inline, expected):
    """A renamed flag, a wrong value type, a missing required option ...: each is reported."""
    problems = check_command(text, inline)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "text, inline",
    [
        ("advpipe train --epochs 3 --limit N --seed $S --aug-opt a=1 --aug-opt b=2", False),
        ("advpipe evaluate --attack", True),  # an inline mention of a flag
        ("advpipe report RUN_DIR... --out report/ [--csv] [--baseline NAME]", False),
        ("advpipe precompute-masks [--workers K | --scheduler ADDRESS] --encoder linear|unet", False),
        ("advpipe -v info", False),
    ],
)
def test_the_checker_accepts_the_synopsis_notation(text, inline):
    assert check_command(text, inline) == []


def test_a_flag_renamed_in_a_doc_line_fails_the_check(tmp_path):
    """The README's pipeline with one flag misspelt, as a doc edit or a CLI rename would leave it, is caught."""
    original = [c for c in doc_commands(ROOT / "README.md") if not c.inline and "--epochs" in c.text]
    assert original and all(check_command(c.text) == [] for c in original)
    doc = tmp_path / "README.md"
    doc.write_text((ROOT / "README.md").read_text().replace("--epochs", "--epoch-count"))
    broken = [c for c in doc_commands(doc, "README.md") if not c.inline and "--epoch-count" in c.text]
    assert broken and all(any("no option --epoch-count" in p for p in check_command(c.text)) for c in broken)
