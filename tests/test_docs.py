"""The documentation: the Sphinx site builds with warnings as errors, and every
public function, class and method with two or more parameters carries numpydoc
``Parameters`` (and, when it returns something, ``Returns``/``Yields``) sections.

Modules are discovered with :func:`pkgutil.walk_packages`, never listed by hand,
so the test follows the package as it is restructured.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import he2st

ROOT = Path(__file__).resolve().parents[1]

_SECTION = r"^[ \t]*{name}[ \t]*\n[ \t]*-{{3,}}[ \t]*$"
_PARAMETERS = re.compile(_SECTION.format(name="Parameters"), re.MULTILINE)
_RETURNS = re.compile(_SECTION.format(name="(?:Returns|Yields)"), re.MULTILINE)
_NO_RETURN = {None, type(None), "None", "NoReturn", "typing.NoReturn", "Never"}


def _public_modules() -> list:
    """Import every module of he2st whose dotted path has no part starting with ``_``."""
    modules = [he2st]
    for info in pkgutil.walk_packages(he2st.__path__, prefix="he2st."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


def _public_objects(module) -> list[tuple[str, object]]:
    """(public name, object) for what a module defines plus what its ``__all__`` re-exports."""
    names = {n for n, obj in vars(module).items() if not n.startswith("_") and getattr(obj, "__module__", None) == module.__name__}
    names.update(n for n in getattr(module, "__all__", ()) if not n.startswith("_"))
    out = []
    for name in sorted(names):
        try:
            obj = getattr(module, name)
        except AttributeError:
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and str(getattr(obj, "__module__", "")).startswith("he2st"):
            out.append((f"{module.__name__}.{name}", obj))
    return out


def _n_params(sig: inspect.Signature, *, bound: bool) -> int:
    """Parameters a caller names: not self/cls, not ``*args``/``**kwargs``."""
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if bound and params and params[0].name in ("self", "cls"):
        params = params[1:]
    return len(params)


def _returns_something(sig: inspect.Signature) -> bool:
    ann = sig.return_annotation
    return ann is not inspect.Signature.empty and ann not in _NO_RETURN


def _check_callable(label: str, func, doc: str | None, *, bound: bool, problems: list[str]) -> None:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return
    if _n_params(sig, bound=bound) < 2:
        return
    doc = doc or ""
    if not _PARAMETERS.search(doc):
        problems.append(f"{label}: no Parameters section")
    if _returns_something(sig) and not _RETURNS.search(doc):
        problems.append(f"{label}: returns {sig.return_annotation} but has no Returns section")


def _init_owner(cls) -> type | None:
    """The class whose ``__init__``/``__new__`` builds ``cls`` (None for ``object``)."""
    for klass in cls.__mro__:
        if klass is object:
            return None
        if "__init__" in vars(klass) or "__new__" in vars(klass):
            return klass
    return None


def _check_class(label: str, cls, problems: list[str]) -> None:
    owner = _init_owner(cls)
    if owner is not None and owner.__module__.startswith("he2st") and not issubclass(cls, enum.Enum):
        try:
            sig = inspect.signature(cls)
        except (TypeError, ValueError):
            sig = None
        if sig is not None and _n_params(sig, bound=False) >= 2:
            init_doc = inspect.getdoc(cls.__init__) if "__init__" in vars(owner) and not dataclasses.is_dataclass(cls) else ""
            doc = (inspect.getdoc(cls) or "") + "\n\n" + (init_doc or "")
            if not _PARAMETERS.search(doc):
                problems.append(f"{label}: no Parameters section (class docstring or __init__)")
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            func, bound = attr.__func__, isinstance(attr, classmethod)
        elif inspect.isfunction(attr):
            func, bound = attr, True
        else:
            continue
        _check_callable(f"{label}.{name}", func, inspect.getdoc(getattr(cls, name)), bound=bound, problems=problems)


def docstring_offenders() -> list[str]:
    """Every public callable of he2st with >= 2 parameters whose docstring lacks a numpydoc section."""
    problems: list[str] = []
    seen: set[int] = set()
    for module in _public_modules():
        for label, obj in _public_objects(module):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            label = f"{obj.__module__}.{obj.__qualname__}"
            if inspect.isclass(obj):
                _check_class(label, obj, problems)
            else:
                _check_callable(label, obj, inspect.getdoc(obj), bound=False, problems=problems)
    return sorted(set(problems))


def test_public_docstrings_have_numpydoc_sections():
    problems = docstring_offenders()
    assert not problems, f"{len(problems)} public callables lack numpydoc sections:\n" + "\n".join(problems)


@pytest.mark.slow
def test_sphinx_site_builds_without_warnings(tmp_path):
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("sphinx is not installed (pip install -e '.[docs]')")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"sphinx-build failed after {seconds:.0f} s:\n{proc.stdout[-5000:]}\n{proc.stderr[-20000:]}"
    assert (tmp_path / "html" / "index.html").is_file()
