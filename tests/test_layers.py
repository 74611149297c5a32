"""The import layers of the library, checked on the source with ``ast`` (nothing is imported or executed).

Rules (docs: DESIGN.md, "Layout"):
1. No library module imports ``gradkit.harness``: the harness (claims, runner, report, CLI) is built on the
   library, never the reverse. ``gradkit.__main__`` is the ``gradkit`` command, part of the harness.
2. ``gradkit.engine`` imports only the standard library, torch, numpy and ``gradkit._validate``,
   ``gradkit.registry`` and ``gradkit.data``.
3. No module imports another module's private name (``from .x import _y``, ``x._y`` on an imported module,
   or a private module from outside its package). Tests may.
4. No import cycle between library modules. Imports inside functions count (they only delay the cycle);
   imports under ``if TYPE_CHECKING:`` do not. Importing ``a.b.c`` also imports the packages ``a.b`` and
   ``a`` (their ``__init__``), so those count as edges too, except the importer's own parent packages.
5. No cycle between the library's subpackages either (``nn`` -> ``functional`` -> ``_validate``, one way).
6. ``torch.autograd.Function`` subclasses (direct or through another Function class) live in
   ``gradkit.functional``.
Every failure names the file and line.
"""
from __future__ import annotations

import ast
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HARNESS = "gradkit.harness"
CLI_ENTRY = "gradkit.__main__"
ENGINE = "gradkit.engine"
ENGINE_ALLOWED_EXTERNAL = {"torch", "numpy", "__future__"}
ENGINE_ALLOWED_INTERNAL = ("gradkit._validate", "gradkit.registry", "gradkit.data")
FUNCTION_HOME = "gradkit.functional"
FUNCTION_BASES = {"torch.autograd.Function", "torch.autograd.function.Function",
                  "torch.autograd.function.InplaceFunction"}

# (importing module, imported private name) -> why it is still there. Each entry is a file this change could
# not edit; remove the entry when the import is fixed.
PRIVATE_IMPORT_EXCEPTIONS: dict[tuple[str, str], str] = {}
# "module.Class" -> why that autograd Function cannot live in gradkit.functional. None today.
FUNCTION_EXCEPTIONS: dict[str, str] = {}


# ------------------------------------------------------------------------------------------ the scanner
@dataclass
class Import:
    target: str          # the imported module (resolved), e.g. "gradkit.functional.noise" or "torch.nn"
    name: str | None     # the imported attribute for ``from target import name`` when it is not a module
    line: int


@dataclass
class Module:
    name: str
    path: Path
    root: Path
    is_pkg: bool
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)   # local name -> dotted name it is bound to

    @property
    def package(self) -> str:
        return self.name if self.is_pkg else self.name.rpartition(".")[0]

    def where(self, line: int) -> str:
        return f"{self.path.relative_to(self.root).as_posix()}:{line}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(mod: Module, level: int, module: str | None) -> str:
    if not level:
        return module or ""
    base = mod.package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def load(src: Path, top: str = "gradkit") -> dict[str, Module]:
    """Parse every module of package ``top`` under ``src`` and record its imports."""
    mods: dict[str, Module] = {}
    for path in sorted((src / top).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        mods[name] = Module(name, path, src, is_pkg, ast.parse(path.read_text(), filename=str(path)))
    for mod in mods.values():
        for node in _runtime_nodes(mod.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    mod.imports.append(Import(a.name, None, node.lineno))
                    if a.asname:
                        mod.aliases[a.asname] = a.name
                    else:
                        head = a.name.split(".")[0]
                        mod.aliases[head] = head
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node.level, node.module)
                for a in node.names:
                    if a.name == "*":
                        mod.imports.append(Import(base, None, node.lineno))
                        continue
                    sub = f"{base}.{a.name}"
                    if sub in mods:
                        mod.imports.append(Import(sub, None, node.lineno))
                    else:
                        mod.imports.append(Import(base, a.name, node.lineno))
                    mod.aliases[a.asname or a.name] = sub
    return mods


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _library(name: str) -> bool:
    return not (_in_package(name, HARNESS) or name == CLI_ENTRY)


# ------------------------------------------------------------------------------------------ the rules
def harness_imports(mods: dict[str, Module]) -> list[str]:
    out = []
    for mod in mods.values():
        if not _library(mod.name):
            continue
        for imp in mod.imports:
            full = f"{imp.target}.{imp.name}" if imp.name else imp.target
            if _in_package(full, HARNESS) or _in_package(imp.target, HARNESS):
                out.append(f"{mod.where(imp.line)}: library module {mod.name} imports {full}; the harness is "
                           "built on the library, never the reverse (move the shared code into the library)")
    return out


def engine_imports(mods: dict[str, Module]) -> list[str]:
    mod = mods.get(ENGINE)
    if mod is None:
        return []
    out = []
    stdlib = set(sys.stdlib_module_names)
    for imp in mod.imports:
        top = imp.target.split(".")[0]
        if top == "gradkit":
            ok = any(_in_package(imp.target, p) for p in ENGINE_ALLOWED_INTERNAL) or (
                imp.target == "gradkit" and imp.name is None)
        else:
            ok = top in stdlib or top in ENGINE_ALLOWED_EXTERNAL
        if not ok:
            full = f"{imp.target}.{imp.name}" if imp.name else imp.target
            out.append(f"{mod.where(imp.line)}: {ENGINE} imports {full}; it may import only the standard "
                       f"library, torch, numpy and {', '.join(ENGINE_ALLOWED_INTERNAL)}")
    return out


def _private_module_violation(importer: str, target: str) -> str | None:
    parts = target.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if _private(part) and not _in_package(importer, ".".join(parts[:i])):
            return ".".join(parts[: i + 1])
    return None


def private_imports(mods: dict[str, Module], exceptions=PRIVATE_IMPORT_EXCEPTIONS, top: str = "gradkit") -> list[str]:
    out = []
    for mod in mods.values():
        found: list[tuple[int, str, str]] = []
        for imp in mod.imports:
            if not _in_package(imp.target, top):
                continue
            bad = _private_module_violation(mod.name, imp.target)
            if bad:
                found.append((imp.line, bad, f"imports the private module {bad} from outside its package"))
            if imp.name and _private(imp.name) and imp.target != mod.name:
                found.append((imp.line, f"{imp.target}.{imp.name}", f"imports the private name {imp.name} of "
                              f"{imp.target}"))
        for node in _runtime_nodes(mod.tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name) or cur.id not in mod.aliases:
                continue
            dotted = mod.aliases[cur.id]
            if dotted not in mods:
                continue
            rest = list(reversed(chain))
            # walk through submodules; the first non-module component is the attribute read
            while len(rest) > 1 and f"{dotted}.{rest[0]}" in mods:
                dotted = f"{dotted}.{rest.pop(0)}"
            if rest[0] == node.attr and len(rest) == 1 and dotted != mod.name:
                found.append((node.lineno, f"{dotted}.{node.attr}", f"reads the private name {node.attr} of "
                              f"module {dotted}"))
        for line, full, what in found:
            if (mod.name, full) in exceptions:
                continue
            out.append(f"{mod.where(line)}: {mod.name} {what}; make it public (in gradkit._validate or its "
                       "module) or move it")
    return out


def import_graph(mods: dict[str, Module]) -> dict[str, dict[str, int]]:
    """module -> {imported library module: first line}, with the implicit package __init__ edges."""
    graph: dict[str, dict[str, int]] = {m: {} for m in mods if _library(m)}
    for mod in mods.values():
        if mod.name not in graph:
            continue
        for imp in mod.imports:
            parts = imp.target.split(".")
            for i in range(1, len(parts) + 1):
                t = ".".join(parts[:i])
                if t not in graph or t == mod.name:
                    continue
                if i < len(parts) and _in_package(mod.name, t):
                    continue  # the importer's own parent packages are already being imported
                graph[mod.name][t] = min(imp.line, graph[mod.name].get(t, imp.line))
    return graph


def _sccs(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # iterative Tarjan would be overkill: the graph has ~100 nodes
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_cycles(mods: dict[str, Module]) -> list[str]:
    graph = import_graph(mods)
    out = []
    for comp in _sccs(graph):
        members = set(comp)
        edges = [f"    {mods[a].where(line)}: {a} -> {b}" for a in comp for b, line in sorted(graph[a].items())
                 if b in members]
        out.append(f"import cycle between {', '.join(comp)}:\n" + "\n".join(edges))
    return out


def package_cycles(mods: dict[str, Module]) -> list[str]:
    """Cycles between the library's subpackages (``nn``, ``functional``, ...; top-level modules count alone)."""
    def unit(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph: dict[str, dict[str, str]] = {}
    for a, targets in import_graph(mods).items():
        if a == "gradkit":
            continue
        graph.setdefault(unit(a), {})
        for b, line in sorted(targets.items()):
            if b != "gradkit" and unit(b) != unit(a):
                graph[unit(a)].setdefault(unit(b), f"{mods[a].where(line)}: {a} -> {b}")
    out = []
    for comp in _sccs({k: dict.fromkeys(v, 0) for k, v in graph.items()}):
        members = set(comp)
        edges = [f"    {graph[a][b]}" for a in comp for b in sorted(graph[a]) if b in members]
        out.append(f"subpackages {', '.join(comp)} import each other (one example import per direction):\n"
                   + "\n".join(edges))
    return out


def _dotted(expr: ast.expr, aliases: dict[str, str]) -> str | None:
    chain = []
    while isinstance(expr, ast.Attribute):
        chain.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    return ".".join([aliases.get(expr.id, expr.id)] + list(reversed(chain)))


def autograd_functions(mods: dict[str, Module]) -> dict[str, tuple[Module, int]]:
    """Every ``torch.autograd.Function`` subclass: "module.Class" -> (module, line)."""
    found: dict[str, tuple[Module, int]] = {}
    classes = [(mod, node) for mod in mods.values() for node in _runtime_nodes(mod.tree)
               if isinstance(node, ast.ClassDef)]
    changed = True
    while changed:  # a subclass of a Function found in another module is a Function too
        changed = False
        for mod, node in classes:
            key = f"{mod.name}.{node.name}"
            if key in found:
                continue
            local = dict(mod.aliases)
            for b in node.bases:
                d = _dotted(b, local)
                if d is None:
                    continue
                if d in FUNCTION_BASES or d in found or f"{mod.name}.{d}" in found:
                    found[key] = (mod, node.lineno)
                    changed = True
                    break
    return found


def misplaced_functions(mods: dict[str, Module], exceptions=FUNCTION_EXCEPTIONS) -> list[str]:
    return [f"{mod.where(line)}: {key} is a torch.autograd.Function outside {FUNCTION_HOME}; move it there "
            "(keep a re-export where the old path is public)"
            for key, (mod, line) in sorted(autograd_functions(mods).items())
            if not _in_package(mod.name, FUNCTION_HOME) and key not in exceptions]


# ------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return load(SRC)


def _report(problems: list[str]) -> None:
    assert not problems, f"{len(problems)} layer violation(s):\n" + "\n".join(problems)


def test_library_never_imports_the_harness(modules):
    _report(harness_imports(modules))


def test_engine_imports_only_the_standard_library_torch_numpy_and_base_modules(modules):
    _report(engine_imports(modules))


def test_no_module_imports_another_modules_private_names(modules):
    _report(private_imports(modules))


def test_library_modules_have_no_import_cycle(modules):
    _report(import_cycles(modules))


def test_library_subpackages_import_one_way(modules):
    _report(package_cycles(modules))


def test_autograd_functions_live_in_functional(modules):
    _report(misplaced_functions(modules))


def test_exception_lists_name_existing_modules(modules):
    for importer, name in PRIVATE_IMPORT_EXCEPTIONS:
        assert importer in modules and name.rpartition(".")[0] in modules, (importer, name)
    for key in FUNCTION_EXCEPTIONS:
        assert key.rpartition(".")[0] in modules, key


# ---------------------------------------------------------------------- the scanner on a made-up package
def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        p = tmp_path / "gradkit" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return load(tmp_path)


def test_scanner_finds_each_kind_of_violation(tmp_path):
    mods = _package(tmp_path, {
        "__init__.py": "",
        "_validate.py": "def check(): ...\n",
        "engine.py": "import json\nimport torch\nfrom . import _validate\nfrom .nn import layer\n",
        "harness/__init__.py": "",
        "harness/cli.py": "from ..nn.layer import _helper\n",
        "nn/__init__.py": "from .layer import Layer\n",
        "nn/layer.py": """
            from typing import TYPE_CHECKING
            import torch
            from torch.autograd import Function as F
            from ..probes import _hooks
            from ..probes import stats
            if TYPE_CHECKING:
                from ..probes.stats import Stat
            class Layer: ...
            class Sign(F): ...
            def _helper(): ...
            def lazy():
                from ..harness import cli
                return stats._private_mean()
            """,
        "probes/__init__.py": "",
        "probes/_hooks.py": "",
        "probes/stats.py": """
            import torch
            class Sub(__import__('torch').nn.Module): ...
            def f():
                from ..nn.layer import Sign
                class Twice(Sign): ...
                import gradkit.functional.ops as ops
                return ops.Op
            def _private_mean(): ...
            """,
        "functional/__init__.py": "",
        "functional/ops.py": "import torch\nclass Op(torch.autograd.Function): ...\n",
    })
    assert [p.split(": ", 1)[0] for p in harness_imports(mods)] == ["gradkit/nn/layer.py:13"]
    assert [p.split(": ", 1)[0] for p in engine_imports(mods)] == ["gradkit/engine.py:4"]
    priv = private_imports(mods, exceptions={})
    assert sorted(p.split(": ", 1)[0] for p in priv) == [
        "gradkit/harness/cli.py:1", "gradkit/nn/layer.py:14", "gradkit/nn/layer.py:5"], priv
    cycles = import_cycles(mods)  # nn.layer -> probes.stats -> nn.layer (inside a function); harness excluded
    assert len(cycles) == 1 and "gradkit.nn.layer, gradkit.probes.stats" in cycles[0], cycles
    assert "gradkit/nn/layer.py:6: gradkit.nn.layer -> gradkit.probes.stats" in cycles[0]
    pc = package_cycles(mods)
    assert len(pc) == 1 and pc[0].startswith("subpackages gradkit.nn, gradkit.probes import each other"), pc
    assert sorted(autograd_functions(mods)) == ["gradkit.functional.ops.Op", "gradkit.nn.layer.Sign",
                                                "gradkit.probes.stats.Twice"]
    assert [p.split(": ", 1)[0] for p in misplaced_functions(mods, exceptions={})] == [
        "gradkit/nn/layer.py:10", "gradkit/probes/stats.py:6"]


def test_scanner_accepts_the_allowed_shapes(tmp_path):
    mods = _package(tmp_path, {
        "__init__.py": "",
        "_validate.py": "",
        "engine.py": "import math\nimport numpy as np\nfrom ._validate import check\nfrom .data.sets import load\n",
        "data/__init__.py": "from .sets import load\n",
        "data/sets.py": "from .._validate import check\n",
        "probes/__init__.py": "from ._hooks import Hook\nfrom .stats import mean\n",
        "probes/_hooks.py": "class Hook: ...\n",
        "probes/stats.py": "from . import _hooks\nfrom ._hooks import Hook\ndef mean(): return _hooks.Hook.__name__\n",
        "harness/__init__.py": "",
        "harness/claims.py": "from ..probes import stats\nimport gradkit.engine\n",
    })
    assert harness_imports(mods) == [] and engine_imports(mods) == []
    assert private_imports(mods, exceptions={}) == []
    assert import_cycles(mods) == []  # package __init__ -> submodule -> sibling is not a cycle
    assert package_cycles(mods) == []
    assert misplaced_functions(mods, exceptions={}) == []
