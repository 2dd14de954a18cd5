"""The method registry: one decorator, discovered built-ins, and other packages' methods.

A method is one file in :mod:`he2st.methods` whose class carries
``@register_method("name")``. The registry finds built-in methods by reading
those decorators from the package's files (no hand-kept list, and listing names
imports no torch); a method module is imported the first time its class is
asked for. Other packages add methods through the entry-point group
``he2st.methods``::

    # pyproject.toml of a third-party package
    [project.entry-points."he2st.methods"]
    mymethod = "mypkg.mymethod:MyMethod"

after which ``create_method("mymethod")``, ``he2st benchmark --methods mymethod``
and a TOML run configuration use it like a built-in.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from he2st.errors import He2stInputError
from he2st.methods.base import Method

#: Entry-point group through which other packages register methods.
ENTRY_POINT_GROUP = "he2st.methods"

_REGISTRY: dict[str, type[Method]] = {}

# ``@register_method("name")`` as written above a class; the test suite checks that
# importing each module registers exactly the names this finds in it.
_DECORATOR = re.compile(r"""^@register_method\(\s*["']([^"']+)["']\s*\)""", re.MULTILINE)


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator registering a :class:`~he2st.methods.base.Method` under ``name``.

    Parameters
    ----------
    name
        Registry name (what ``create_method`` and ``--methods`` take).

    Returns
    -------
    callable
        The decorator; it sets ``cls.name`` and returns the class unchanged.

    Raises
    ------
    TypeError
        The decorated object is not a ``Method`` subclass.
    ValueError
        ``name`` is already registered to another class.
    """

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{cls!r} is not a he2st Method subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method name {name!r} is already registered to {existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


@functools.cache
def builtin_methods() -> dict[str, str]:
    """Built-in method names and the modules that define them, read from the package's files.

    Returns
    -------
    dict
        ``{name: "he2st.methods.<module>"}`` for every ``@register_method`` in
        a top-level module of :mod:`he2st.methods`.
    """
    found: dict[str, str] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.stem.startswith("_") or path.stem in ("base", "registry"):
            continue
        for name in _DECORATOR.findall(path.read_text(encoding="utf-8")):
            if name in found:
                raise RuntimeError(f"method {name!r} is declared in both {found[name]} and he2st.methods.{path.stem}")
            found[name] = f"he2st.methods.{path.stem}"
    return found


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_methods() -> list[str]:
    """Names of every method: built-in, registered in this process, and from entry points.

    Returns
    -------
    list of str
        Sorted names.
    """
    return sorted(set(builtin_methods()) | set(_REGISTRY) | set(_entry_points()))


def get_method_class(name: str) -> type[Method]:
    """The class registered under ``name``, importing its module on first use.

    Parameters
    ----------
    name
        A name from :func:`list_methods`.

    Returns
    -------
    type
        The :class:`~he2st.methods.base.Method` subclass.

    Raises
    ------
    He2stInputError
        No method has that name, or an entry point names something that is not a method.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    module = builtin_methods().get(name)
    if module is not None:
        importlib.import_module(module)  # registers via the decorator
        if name not in _REGISTRY:
            raise RuntimeError(f"{module} did not register method {name!r}")
        return _REGISTRY[name]
    ep = _entry_points().get(name)
    if ep is None:
        raise He2stInputError(f"unknown method {name!r}; available: {list_methods()}")
    obj = ep.load()
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise He2stInputError(
            f"entry point {name!r} of group {ENTRY_POINT_GROUP!r} ({ep.value}) is not a he2st Method subclass"
        )
    if _REGISTRY.get(name) is not obj:
        register_method(name)(obj)
    return obj


def create_method(name: str, **params: Any) -> Method:
    """Instantiate a method with its paper's defaults, overridden by ``params``.

    Parameters
    ----------
    name
        A name from :func:`list_methods`.
    **params
        Parameters of that method (``method_info(name)["defaults"]`` lists them).

    Returns
    -------
    Method
        An unfitted method.
    """
    return get_method_class(name)(**params)


def load_method(path: str | Path) -> Method:
    """Load any saved method; its class is read from ``method.json``.

    Parameters
    ----------
    path
        A folder written by :meth:`Method.save`.

    Returns
    -------
    Method
        The fitted method.
    """
    return Method.load(path)


def method_info(name: str) -> dict[str, Any]:
    """What ``he2st methods`` shows of a method.

    Parameters
    ----------
    name
        A name from :func:`list_methods`.

    Returns
    -------
    dict
        ``name``, ``family``, ``paper``, ``module``, ``class``, ``summary`` (first docstring
        line), ``defaults`` (common and paper defaults) and ``capabilities``.
    """
    cls = get_method_class(name)
    doc = (cls.__doc__ or "").strip().splitlines()
    return {
        "name": name,
        "family": cls.family,
        "paper": cls.paper,
        "module": cls.__module__,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "summary": doc[0] if doc else "",
        "defaults": {**cls.common_defaults, **cls.defaults},
        "capabilities": asdict(cls.capabilities),
    }


__all__ = [
    "ENTRY_POINT_GROUP",
    "builtin_methods",
    "create_method",
    "get_method_class",
    "list_methods",
    "load_method",
    "method_info",
    "register_method",
]
