"""Names taken from data, kept inside the directory they are written under.

A model table travels between people through shared lakes, and its rows name the files a
worker writes before any model loads; its sha256 is the author's own, so it proves the bytes
arrived whole, not who wrote them. Tar chunk rows and lake table names are the same kind of
input. Each such name goes through :func:`inside` before anything is written: an absolute
name, a ``..`` step, or a link on the way that leads out of the destination is refused,
naming the entry.

Example:
    >>> inside("/models/m", "variables/v.index", what="model table row").as_posix()
    '/models/m/variables/v.index'
    >>> inside("/models/m", "../../root/.bashrc", what="model table row")
    Traceback (most recent call last):
    udf_engine.errors.UnsafePathError: model table row '../../root/.bashrc': refused, it would be written outside /models/m
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from udf_engine.errors import UnsafePathError


def inside(root: str | os.PathLike, name: str, *, what: str) -> Path:
    """``root / name``, which must lie strictly below ``root`` once every link on the way is followed.

    ``what`` says where the name came from, for the error: ``model table row``, ``tar entry``.
    """
    pure = PurePosixPath(name)
    if not name or "\0" in name or pure.is_absolute() or ".." in pure.parts or pure == PurePosixPath("."):
        raise _outside(name, root, what)
    base = Path(root).resolve()
    target = Path(root) / pure
    if not target.resolve().is_relative_to(base) or target.resolve() == base:
        raise _outside(name, root, what)
    return target


def _outside(name: str, root: str | os.PathLike, what: str) -> UnsafePathError:
    return UnsafePathError(f"{what} {name!r}: refused, it would be written outside {root}")
