"""The names Byzer code imports from ``pyjava.udf`` (``from pyjava.udf import UDFBuilder, UDFBuildInFunc``).

A real module, so that a function using them ships to Ray workers by reference to it.

Example:
    >>> UDFBuilder.__module__, UDFBuildInFunc.__module__
    ('udf_engine.actors.builder', 'udf_engine.models.loaders')
"""

from __future__ import annotations

from udf_engine.actors.builder import UDFBuilder
from udf_engine.actors.master import UDFMaster
from udf_engine.actors.worker import UDFWorker
from udf_engine.models.loaders import UDFBuildInFunc

__all__ = ["UDFBuildInFunc", "UDFBuilder", "UDFMaster", "UDFWorker"]
