"""Byzer's ``pyjava`` import names, resolving to this project's modules while Byzer code runs.

MLSQL/Byzer scripts import ``from pyjava.api.mlsql import RayContext, PythonContext``,
``from pyjava.udf import UDFBuilder, UDFBuildInFunc``, ``from pyjava import rayfix`` and
``from pyjava.storage import streaming_tar``. :func:`pyjava_modules` makes those names
resolve while such code runs, and removes them afterwards (a real ``pyjava`` installed
beside rayudf is left as it was). Each name is an alias of a real module of
``udf_engine``, so functions that use them pickle by reference to modules every Ray
worker can import.

Example:
    >>> with pyjava_modules():
    ...     from pyjava.api.mlsql import RayContext
    ...     from pyjava.storage import streaming_tar
    >>> RayContext.__module__, streaming_tar.__name__
    ('udf_engine.byzer.ray_context', 'udf_engine.models.streaming_tar')
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from udf_engine.byzer import ray_context, udf
from udf_engine.models import streaming_tar

# A module name no process can import: functions marked with it pickle by value.
_BY_VALUE_MODULE = "__rayudf_by_value__"
_lock = threading.Lock()
_users = 0  # pyjava_modules() blocks running now
_saved: dict[str, types.ModuleType | None] = {}  # what the names were before the first of them


def last(func: Callable) -> Callable:
    """Byzer's ``rayfix.last``: ship ``func`` to Ray workers by value, not by module name."""
    func.__module__ = _BY_VALUE_MODULE
    return func


def _package(name: str, **children: types.ModuleType) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so `from pyjava.storage import streaming_tar` looks inside
    for child, value in children.items():
        setattr(module, child, value)
    return module


@contextmanager
def pyjava_modules() -> Iterator[None]:
    """Make the ``pyjava`` import names of Byzer code resolve to rayudf's, for a while.

    Nested and concurrent uses (a registration on one thread, a run statement on another)
    share one installation: the names go when the last of them ends.
    """
    global _users, _saved
    with _lock:
        if _users == 0:
            modules = _modules()
            _saved = {name: sys.modules.get(name) for name in modules}
            sys.modules.update(modules)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                for name, module in _saved.items():
                    if module is None:
                        sys.modules.pop(name, None)
                    else:
                        sys.modules[name] = module


def _modules() -> dict[str, types.ModuleType]:
    rayfix = sys.modules[__name__]
    storage = _package("pyjava.storage", streaming_tar=streaming_tar)
    api = _package("pyjava.api", mlsql=ray_context)
    pyjava = _package("pyjava", api=api, udf=udf, rayfix=rayfix, storage=storage)
    return {
        "pyjava": pyjava,
        "pyjava.api": api,
        "pyjava.api.mlsql": ray_context,
        "pyjava.udf": udf,
        "pyjava.rayfix": rayfix,
        "pyjava.storage": storage,
        "pyjava.storage.streaming_tar": streaming_tar,
    }
