"""Build hook: the wheel carries ``callbacks-stubs/__init__.pyi``, made from ``callbacks.py``.

PEP 561 gives a lone module no way to say it is typed (``py.typed`` marks a package), so an
installed ``callbacks.py`` is "untyped" to mypy and pyright. A stub-only package named
``callbacks-stubs`` in the same wheel is the standard way round: type checkers read it in
place of the module. The stub is not kept in the repository: it is made here, at each wheel
build, from ``callbacks.py`` itself (its declarations, docstrings and annotations, with every
body cut to ``...``), so it cannot drift; CI runs mypy's ``stubtest`` on the installed wheel to
check it against the module as it runs. An editable install gets no stub: the checker there
should read the source itself.
"""

from __future__ import annotations

import ast
import itertools
import pathlib
import shutil
import tempfile
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

STUB = "callbacks-stubs/__init__.pyi"


def stub_of(source: str) -> str:
    """The stub of a module's ``source``: what a type checker needs, and no code to run.

    It declares the public names (``__all__``) and the private ones their declarations refer
    to (a base class, a type in a signature), each as the source declares it: classes with
    their class-level declarations and methods, functions with their signature and docstring,
    their bodies cut to ``...``; nothing that runs at import, no ``__slots__``.
    """
    tree = ast.parse(source)
    body = _declarations(tree.body)
    defined: dict[str, ast.stmt] = {}
    for node in body:
        for name in _defines(node):
            defined.setdefault(name, node)
    public = defined["__all__"]
    assert isinstance(public, ast.Assign)
    wanted = {"__all__", "__version__", *ast.literal_eval(public.value)}
    kept: set[int] = set()
    while wanted:
        found = defined.get(wanted.pop())
        if found is None or id(found) in kept:
            continue
        kept.add(id(found))
        wanted |= _mentions(found) & defined.keys()
    tree.body = [
        node
        for node in body
        if id(node) in kept or isinstance(node, ast.Import | ast.ImportFrom | ast.Expr)
    ]
    header = "".join(
        itertools.takewhile(lambda line: line.startswith("#"), source.splitlines(True))
    )
    made = "#\n# This stub was made from callbacks.py at build time (.ci/hatch_build.py).\n"
    return f"{header}{made}{ast.unparse(tree)}\n"  # the license header, as the source has it


def _private(member: ast.stmt) -> bool:
    """Whether a class member is the class's own business (``_name``, not ``__dunder__``)."""
    return any(n.startswith("_") and not n.endswith("__") for n in _defines(member))


def _defines(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _mentions(node: ast.AST) -> set[str]:
    """The names ``node`` refers to, in its code and in its string annotations."""
    names = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            names.add(child.id)
        elif isinstance(child, ast.Constant) and isinstance(child.value, str):
            try:
                names |= _mentions(ast.parse(child.value, mode="eval"))
            except SyntaxError:  # a docstring or any other text
                pass
    return names


def _declarations(body: list[ast.stmt]) -> list[ast.stmt]:
    kept: list[ast.stmt] = []
    overloaded: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            decorators = {ast.unparse(d) for d in node.decorator_list}
            if "overload" in decorators:
                overloaded.add(node.name)
            elif node.name in overloaded:  # the implementation after its overloads
                continue
            if isinstance(node, ast.AsyncFunctionDef) and _yields(node):
                # An async generator is declared as a function returning one: with its body
                # cut, ``async def`` would declare a coroutine.
                node = ast.copy_location(
                    ast.FunctionDef(**{f: getattr(node, f) for f in node._fields}), node
                )
            docstring = ast.get_docstring(node, clean=False)
            node.body = [ast.Expr(ast.Constant(...))]
            if docstring is not None:
                node.body.insert(0, ast.Expr(ast.Constant(docstring)))
            node.decorator_list = [  # what a checker reads; not what merely registers it
                d for d in node.decorator_list if ast.unparse(d) != "atexit.register"
            ]
            kept.append(node)
        elif isinstance(node, ast.ClassDef):
            attributes = _attributes(node)  # before `_declarations` cuts ``__init__``
            members = [m for m in _declarations(node.body) if not _private(m)]
            first = 1 if members and isinstance(members[0], ast.Expr) else 0  # its docstring
            members[first:first] = attributes
            node.body = members or [ast.Expr(ast.Constant(...))]
            kept.append(node)
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            kept.extend(_declarations(node.body))  # declared for checkers: the stub's own
        elif isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__slots__":
            continue  # how instances are laid out: nothing a checker reads
        elif isinstance(node, ast.Import | ast.ImportFrom | ast.Assign | ast.AnnAssign):
            kept.append(node)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and not kept:
            kept.append(node)  # the docstring
        # Anything else runs at import (a call, a guard): nothing a checker reads.
    return kept


def _attributes(cls: ast.ClassDef) -> list[ast.stmt]:
    """The public instance attributes ``cls.__init__`` declares (``self.name: str = name``),
    as class-level declarations (``name: str``): with the bodies cut, they would be lost."""
    found: list[ast.stmt] = []
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            for statement in ast.walk(node):
                target = getattr(statement, "target", None)
                if (
                    isinstance(statement, ast.AnnAssign)
                    and isinstance(target, ast.Attribute)
                    and ast.unparse(target.value) == "self"
                    and not target.attr.startswith("_")
                ):
                    declared = ast.AnnAssign(ast.Name(target.attr), statement.annotation, None, 1)
                    found.append(ast.copy_location(declared, statement))
    return found


def _yields(function: ast.AsyncFunctionDef) -> bool:
    """Whether ``function``'s own body yields (not a function nested in it)."""
    nodes: list[ast.AST] = list(function.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Yield | ast.YieldFrom):
            return True
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            nodes.extend(ast.iter_child_nodes(node))
    return False


class StubsHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        self._made = pathlib.Path(tempfile.mkdtemp(prefix="callbacks-stubs-"))
        stub = self._made / "__init__.pyi"
        source = pathlib.Path(self.root, "callbacks.py").read_text(encoding="utf-8")
        stub.write_text(stub_of(source), encoding="utf-8")
        build_data["force_include"][str(stub)] = STUB

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if hasattr(self, "_made"):
            shutil.rmtree(self._made, ignore_errors=True)
