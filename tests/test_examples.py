"""Every class that ``hf_mm_rerank`` exports shows a short example in its docstring, and every example compiles.

An example is an ``Example:`` section of doctest lines (``>>>`` / ``...``, the package's usual form) or an
``Example::`` literal block of plain code. The docstrings are read from the source with ``ast`` (importing every
export would load transformers, peft and torch: seconds), following the package's lazy ``_EXPORTS`` map and the
re-exports of each package's ``__init__``. The examples are compiled, never run: they load models from the Hub.
"""

from __future__ import annotations

import ast
import textwrap
from functools import cache
from pathlib import Path

import pytest

import hf_mm_rerank

PACKAGE = Path(hf_mm_rerank.__file__).resolve().parent
HEADERS = ("Example:", "Example::", "Examples:", "Examples::")


def module_file(module: str) -> Path:
    """The source of ``module``, a dotted path inside the package (``"losses"``, ``"data.inputs"``)."""
    base = PACKAGE.joinpath(*module.split(".")) if module else PACKAGE
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise AssertionError(f"hf_mm_rerank.{module}: no source file at {base}(.py)")


@cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def definition(module: str, name: str) -> ast.AST:
    """The node that defines ``name`` in ``module``: a class, function or assignment, found by following
    ``from .x import name`` re-exports."""
    path = module_file(module)
    for node in parsed(path).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
        if isinstance(node, ast.ImportFrom) and node.level and any(
                (alias.asname or alias.name) == name for alias in node.names):
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            parts = module.split(".") if module else []
            package = parts if path.name == "__init__.py" else parts[:-1]
            package = package[:len(package) - (node.level - 1)]
            return definition(".".join([*package, *(node.module.split(".") if node.module else [])]), original)
    raise AssertionError(f"hf_mm_rerank.{module} does not define {name}")


@cache
def exported_classes() -> dict[str, str]:
    """``{name: docstring}`` of every class in ``hf_mm_rerank.__all__``."""
    classes = {}
    for name in hf_mm_rerank.__all__:
        if name == "__version__":
            continue
        node = definition(hf_mm_rerank._EXPORTS[name], name)
        if isinstance(node, ast.ClassDef):
            classes[name] = ast.get_docstring(node) or ""
    return classes


def examples(doc: str) -> list[str]:
    """The code of each example section of a (cleaned) docstring: its lines indented under the header, doctest
    prompts removed (``Example:``) or dedented as they are (``Example::``)."""
    lines, found = doc.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() not in HEADERS:
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following)
        if line.strip().endswith("::"):
            code = textwrap.dedent("\n".join(block)).strip("\n")
        else:
            prompts = [s for s in textwrap.dedent("\n".join(block)).splitlines() if s.startswith((">>>", "..."))]
            code = "\n".join(s[4:] for s in prompts)  # ">>> x" / "...     y" -> "x" / "    y"
        if code.strip():
            found.append(code)
    return found


def test_the_exports_are_found():
    """The source reading sees the classes the package exports (a broken lookup must not pass the test below)."""
    classes = exported_classes()
    assert len(classes) >= 30, sorted(classes)
    for name in ("BiEncoder", "CrossEncoderTrainer", "Tokens", "InputError", "TokenEmbeddings", "MarginMSELoss"):
        assert name in classes


def test_every_exported_class_has_an_example():
    missing = sorted(name for name, doc in exported_classes().items() if not examples(doc))
    assert not missing, (f"exported classes without an example in their docstring: {missing}. Fix: add an "
                         "'Example:' section of '>>>' lines showing the typical use.")


@pytest.mark.parametrize("name", sorted(exported_classes()))
def test_examples_compile(name):
    for n, code in enumerate(examples(exported_classes()[name])):
        compile(code, f"<{name} example {n + 1}>", "exec")


def test_the_example_reader():
    """Both forms are read, and what is not an example is not taken for one."""
    doc = textwrap.dedent('''\
        Summary.

        Example:
            >>> try:
            ...     x = f(1)
            ... except ValueError:
            ...     pass
            >>> g(x)
            3

        Example::

            y = h(2)
            if y:
                print(y)

        Args:
            a: not code.
        ''')
    assert examples(doc) == ["try:\n    x = f(1)\nexcept ValueError:\n    pass\ng(x)", "y = h(2)\nif y:\n    print(y)"]
    assert examples("Summary.\n\nExample:\n    Prose only, no code.\n") == []
    assert examples("Summary without one.") == []
    with pytest.raises(SyntaxError):
        compile(examples("S.\n\nExample:\n    >>> f(1, \n")[0], "<broken>", "exec")
