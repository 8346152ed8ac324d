"""The import layers (docs/library.md#layers): no module of advpipe imports from a layer above its own.

Every module under advpipe/ is parsed with ``ast``; every ``import`` and ``from ... import`` of an
advpipe module, at the top or inside a function, counts. Lowest first:

0. ground helpers: errors, progress, registry, devices, files, fraction, yamlfile, cluster, paths, precision, rng
1. data   2. models   3. attacks   4. augment, pipeline (siblings: neither imports the other)
5. train, eval, api (the library facade)   6. study, demo, preview   7. commands, cli, __main__

``advpipe/__init__.py`` only names the public API lazily and ``from advpipe import __version__`` reads
the root, so the root package has no layer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "advpipe"

LAYERS: dict[str, int] = {
    **dict.fromkeys(("errors", "progress", "registry", "devices", "files", "fraction", "yamlfile", "cluster", "paths", "precision", "rng"), 0),
    "data": 1,
    "models": 2,
    "attacks": 3,
    "augment": 4,
    "pipeline": 4,
    **dict.fromkeys(("train", "eval", "api"), 5),
    **dict.fromkeys(("study", "demo", "preview"), 6),
    **dict.fromkeys(("commands", "cli", "__main__"), 7),
}
#: units of one layer that must not import each other
SIBLINGS = [{"augment", "pipeline"}]

#: Upward imports in files another task is editing now; each entry names what is left to do.
#: The test fails when one disappears, so the list never outlives the violation.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str | None:
    """The layer unit of an advpipe module (``advpipe.pipeline.reader`` -> ``pipeline``), None for the root."""
    parts = module.split(".")
    return parts[1] if parts[0] == "advpipe" and len(parts) > 1 else None


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every advpipe module imported anywhere in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "advpipe":  # from advpipe import x: a subpackage, or a name of the root
                found += [(node.lineno, f"advpipe.{a.name}") for a in node.names if a.name in LAYERS]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] == "advpipe"]


def _all_imports() -> list[tuple[str, int, str]]:
    rows = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for line, target in _imported(ast.parse(path.read_text(), filename=str(path))):
            rows.append((module, line, target))
    return rows


def _violations() -> list[tuple[str, int, str]]:
    bad = []
    for module, line, target in _all_imports():
        mine, theirs = _unit(module), _unit(target)
        if mine is None or theirs is None or mine == theirs:
            continue
        if LAYERS[theirs] > LAYERS[mine] or any({mine, theirs} == pair for pair in SIBLINGS):
            bad.append((module, line, target))
    return bad


def test_every_module_has_a_layer() -> None:
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")} - {None}
    assert units <= set(LAYERS), f"give these a layer in tests/test_layers.py: {sorted(units - set(LAYERS))}"
    targets = {_unit(t) for _, _, t in _all_imports()} - {None}
    assert targets <= set(LAYERS), sorted(targets - set(LAYERS))


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    found = _violations()
    unexpected = [f"{m}:{line} imports {t}" for m, line, t in found if (m, t) not in KNOWN_EXCEPTIONS]
    assert not unexpected, "upward imports:\n" + "\n".join(unexpected)
    stale = KNOWN_EXCEPTIONS - {(m, t) for m, _, t in found}
    assert not stale, f"fixed, so remove from KNOWN_EXCEPTIONS: {sorted(stale)}"


def test_imports_are_absolute() -> None:
    """A relative import would hide from the layer check."""
    relative = [f"{_module_name(p)}:{node.lineno}" for p in sorted(PACKAGE.rglob("*.py"))
                for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, relative


@pytest.mark.parametrize("source, expected", [
    ("from advpipe.train.config import TrainConfig", [(1, "advpipe.train.config")]),
    ("def f():\n    import advpipe.eval.run as r", [(2, "advpipe.eval.run")]),
    ("from advpipe import __version__, pipeline", [(1, "advpipe.pipeline")]),
    ("from . import x\nimport numpy", []),
])
def test_imports_are_found_at_the_top_and_inside_functions(source: str, expected) -> None:
    assert _imported(ast.parse(source)) == expected


def _module_map_names() -> set[str]:
    """The backticked names of docs/library.md's "Module map" section (``_blur`` means ``corruptions_blur``)."""
    text = (PACKAGE.parent / "docs" / "library.md").read_text()
    section = text[text.index("## Module map"):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    names = set(re.findall(r"`([A-Za-z0-9_/]+)`", section))
    return {f"corruptions{n}" if n.startswith("_") else n.rstrip("/") for n in names}


def test_the_module_map_names_every_module_and_only_modules() -> None:
    files = [p for p in PACKAGE.rglob("*.py") if "builtin" not in p.parts and p.stem not in ("__init__", "__main__")]
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    names = _module_map_names()
    # commands/ is named as a whole ("one module per command"), apart from its three helpers
    missing = sorted({p.stem for p in files if p.parent.name != "commands" or p.stem in ("reporting", "errors_cli",
                                                                                      "flags")} - names)
    assert not missing, f"docs/library.md's module map does not name: {missing}"
    unknown = sorted(names - {p.stem for p in files} - packages)
    assert not unknown, f"docs/library.md's module map names no module: {unknown}"
