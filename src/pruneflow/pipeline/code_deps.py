"""Which project source files a stage runs: the static import closure of its CLI module.

Both engines rerun a stage when one of these files changes (Snakemake: rule inputs, DVC: deps), so
the list has to hold every module the stage can import, imports inside functions included (stages
import heavy libraries lazily, and so do some project modules). It is read from the source with
`ast` on every run instead of being kept by hand, so a new import is a new dependency at once.
Imports under `if TYPE_CHECKING:` never run and are left out. Python's import machinery offers no
static closure (modulefinder follows only top-level imports and misses package `__init__` files run
on the way), hence this small walker.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGE = "pruneflow"


def _module_file(src_root: Path, module: str) -> Path | None:
    base = src_root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_runtime(tree: ast.AST) -> Iterable[ast.AST]:
    """Every node, except the bodies of `if TYPE_CHECKING:` blocks (their `else:` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


@cache
def _imports_of(path: Path, module: str, mtime_ns: int) -> frozenset[str]:
    """Project modules named by the import statements of one file (mtime_ns keys the cache)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    named: set[str] = set()
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return frozenset(name for name in named if name == PACKAGE or name.startswith(PACKAGE + "."))


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(src_root: str | Path, module: str) -> list[Path]:
    """The files of every project module that importing `module` can run, sorted."""
    src_root = Path(src_root)
    seen: set[str] = set()
    files: set[Path] = set()
    pending = list(_with_parents(module))
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(src_root, name)
        if path is None:  # an attribute (`from pkg import function`), not a module
            continue
        files.add(path)
        for imported in _imports_of(path, name, path.stat().st_mtime_ns):
            pending.extend(_with_parents(imported))
    return sorted(files)


def stage_code(project_root: str | Path, module: str) -> list[str]:
    """`import_closure` as project-relative POSIX paths (what dvc.yaml and the Snakefile list)."""
    root = Path(project_root)
    return [path.relative_to(root).as_posix() for path in import_closure(root / "src", module)]
