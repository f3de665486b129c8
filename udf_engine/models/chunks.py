"""The shape of a chunk row, shared by model tables (:mod:`.store`) and Byzer's tar chunks (:mod:`.streaming_tar`).

A model travels as rows of bytes: ``start`` (the chunk's byte position), ``offset`` (its
length: the name Byzer's ``pyjava.storage.streaming_tar`` gives that column) and ``value``
(the bytes). A model table adds ``path``, the file inside the model each chunk belongs to.

Example:
    >>> {START: 0, LENGTH: 3, VALUE: b"abc"}
    {'start': 0, 'offset': 3, 'value': b'abc'}
"""

from __future__ import annotations

START = "start"
LENGTH = "offset"
VALUE = "value"
PATH = "path"
# 4 MiB keeps each object-store entry small enough to stream and large enough
# that a 100 MB model is only ~25 rows.
CHUNK_BYTES = 4 << 20
