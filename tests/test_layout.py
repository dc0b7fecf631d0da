"""The import direction between the four packages, read from the source (nothing is imported):

    chatbuild/   the core: imports none of the programs (only chatbuild/cli.py names them, as strings
                 in its lazy command table, which is a table and not an import)
    pipelines/   programs that make models: may import the core, not serve/ or eval/
    serve/       programs that serve models: may import the core, not pipelines/ or eval/
    eval/        programs that evaluate models: may import the core, not pipelines/ or serve/

What counts as an import: `import x` and `from x import y` anywhere in a module (inside functions
too), `importlib.import_module("x")` with a literal name, and `-m x` in a literal argument list
(`[sys.executable, "-m", "x", ...]`): starting a program is depending on it as much as importing it.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("chatbuild", "pipelines", "serve", "eval")
# package → the packages it must not import
FORBIDDEN = {
    "chatbuild": {"pipelines", "serve", "eval"},
    "pipelines": {"serve", "eval"},
    "serve": {"pipelines", "eval"},
    "eval": {"pipelines", "serve"},
}

def imports_of(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for every import, literal `importlib.import_module` and `-m` target in `path`;
    relative imports resolve against `package` (default: the file's own, inside the repository)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y, relative to this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and _name(node.func) == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = node.elts
            for flag, target in zip(items, items[1:]):
                if _literal(flag) == "-m" and isinstance(_literal(target), str):
                    found.append((target.lineno, _literal(target)))
    return found


def _name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _literal(node: ast.expr):
    return node.value if isinstance(node, ast.Constant) else None


def back_imports() -> list[tuple[str, int, str]]:
    """(file, line, module) for every import against the direction above."""
    bad = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for line, module in imports_of(path):
                if module.split(".")[0] in FORBIDDEN[package]:
                    bad.append((rel, line, module))
    return bad


def test_no_package_imports_against_the_direction():
    found = back_imports()
    assert not found, "imports against the direction core ← programs:\n" + "\n".join(
        f"  {f}:{line}: imports {m} ({f.split('/')[0]}/ must not import {m.split('.')[0]}/)" for f, line, m in found)


def test_the_command_table_is_the_one_place_the_core_names_the_programs():
    """chatbuild/cli.py names the programs only as strings in COMMANDS, never as imports."""
    from chatbuild.cli import COMMANDS

    programs = {module.split(".")[0] for module, _ in COMMANDS.values()}
    assert {"pipelines", "serve", "eval"} <= programs
    assert not [m for _, m in imports_of(REPO / "chatbuild" / "cli.py") if m.split(".")[0] in FORBIDDEN["chatbuild"]]


@pytest.mark.parametrize("source, expected", [
    ("import pipelines.finetune\n", [(1, "pipelines.finetune")]),
    ("def f():\n    from eval.run import evaluate\n", [(2, "eval.run")]),
    ("import importlib\nimportlib.import_module('serve.app')\n", [(1, "importlib"), (2, "serve.app")]),
    ("import sys\ncmd = [sys.executable, '-m', 'pipelines.finetune', 'tiny-cpu']\n",
     [(1, "sys"), (2, "pipelines.finetune")]),
    ("from . import x\n", [(1, "chatbuild")]),
    ("COMMANDS = {'finetune': ('pipelines.finetune', 'help')}\n", []),  # a string in a table
])
def test_the_scanner_sees_every_kind_of_import(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert sorted(imports_of(path, package="chatbuild")) == expected
