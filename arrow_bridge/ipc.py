"""Arrow IPC streams from callers we do not trust: read only what cannot grow past what was sent.

An IPC body is checked before any of it is decoded, and in full after:
- compressed buffers (LZ4/ZSTD) are refused: a megabyte of zstd can inflate to gigabytes, and
  Arrow decompresses a whole batch at once, with no bound;
- encodings whose decoded size is not the body's (dictionaries, run-ends, views: one value
  referenced by millions of rows; extension types, which may hide them) are refused, and so are
  types whose rows take no bytes (null, zero-width) and streams that say they hold more rows
  than their bytes can;
- ``validate(full=True)``: an offset that points past its buffer passes Arrow's cheap checks
  when a stream is read, and would be read out of bounds later.

Example:
    >>> import io
    >>> sink = io.BytesIO()
    >>> with pa.ipc.new_stream(sink, pa.schema([("x", pa.int64())])) as w:
    ...     w.write_table(pa.table({"x": [1, 2]}))
    >>> read_untrusted(sink.getvalue()).column("x").to_pylist()
    [1, 2]
    >>> options = pa.ipc.IpcWriteOptions(compression="zstd")
    >>> sink = io.BytesIO()
    >>> with pa.ipc.new_stream(sink, pa.schema([("x", pa.int64())]), options=options) as w:
    ...     w.write_table(pa.table({"x": [1, 2]}))
    >>> read_untrusted(sink.getvalue())
    Traceback (most recent call last):
    arrow_bridge.ipc.UntrustedStreamError: the Arrow stream has compressed buffers; send it uncompressed
"""

from __future__ import annotations

import struct

import pyarrow as pa

# The MessageHeader union's members that carry buffers (Arrow's format/Message.fbs).
_DICTIONARY_BATCH, _RECORD_BATCH = 2, 3
# Every row of a type that is taken costs at least a bit (a boolean, a validity bit): a stream that
# says it holds more rows than that says what its bytes cannot hold.
_ROWS_PER_BYTE = 8
# Field numbers in the flatbuffer tables of Message.fbs.
_MESSAGE_HEADER_TYPE, _MESSAGE_HEADER = 1, 2
_DICTIONARY_BATCH_DATA = 1
_RECORD_BATCH_COMPRESSION = 3


class UntrustedStreamError(Exception):
    """An IPC body that is not a plain, whole Arrow stream."""


def read_untrusted(body: bytes) -> pa.Table:
    """The table of an Arrow IPC stream ``body``, or UntrustedStreamError saying what is wrong with it."""
    try:
        reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(body))
        for message in reader:
            if _compressed(message.metadata.to_pybytes()):
                raise UntrustedStreamError("the Arrow stream has compressed buffers; send it uncompressed")
        stream = pa.ipc.open_stream(body)
        _check_types(stream.schema)
        table = stream.read_all()
        table.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, struct.error, IndexError, ValueError) as err:
        raise UntrustedStreamError(f"the body is not a whole Arrow IPC stream: {err}") from None
    if table.num_rows > _ROWS_PER_BYTE * len(body):
        raise UntrustedStreamError(f"the Arrow stream says it holds {table.num_rows:,} rows, more than its {len(body):,} bytes can")
    return table


def _check_types(schema: pa.Schema) -> None:
    for field in schema:
        stack = [field.type]
        while stack:
            kind = stack.pop()
            if isinstance(kind, pa.ExtensionType) or pa.types.is_dictionary(kind) or pa.types.is_run_end_encoded(kind) or _is_view(kind):
                raise UntrustedStreamError(f"column {field.name!r}: {kind} is not taken; send plain (not encoded) arrays")
            if _is_empty(kind):
                raise UntrustedStreamError(f"column {field.name!r}: {kind} holds nothing in each row; it is not taken")
            stack += [kind.field(i).type for i in range(kind.num_fields)]


def _is_view(kind: pa.DataType) -> bool:
    return kind.id in {pa.string_view().id, pa.binary_view().id, pa.list_view(pa.int8()).id, pa.large_list_view(pa.int8()).id}


def _is_empty(kind: pa.DataType) -> bool:
    """Types whose rows take no bytes, so that a few bytes can say a stream holds billions of them."""
    return (
        pa.types.is_null(kind)
        or (pa.types.is_fixed_size_binary(kind) and kind.byte_width == 0)
        or (pa.types.is_fixed_size_list(kind) and kind.list_size == 0)
        or (pa.types.is_struct(kind) and kind.num_fields == 0)
    )


def _compressed(metadata: bytes) -> bool:
    """Whether an IPC message's body has compressed buffers: the ``compression`` field of its
    RecordBatch (a DictionaryBatch's data is one too), read straight from the flatbuffer."""
    table = _table(metadata, struct.unpack_from("<I", metadata, 0)[0])
    kind_at, header_at = _field(metadata, table, _MESSAGE_HEADER_TYPE), _field(metadata, table, _MESSAGE_HEADER)
    kind = metadata[kind_at] if kind_at is not None else 0
    if kind not in (_DICTIONARY_BATCH, _RECORD_BATCH) or header_at is None:
        return False
    batch = _table(metadata, header_at + struct.unpack_from("<I", metadata, header_at)[0])
    if kind == _DICTIONARY_BATCH:
        data_at = _field(metadata, batch, _DICTIONARY_BATCH_DATA)
        if data_at is None:
            return False
        batch = _table(metadata, data_at + struct.unpack_from("<I", metadata, data_at)[0])
    return _field(metadata, batch, _RECORD_BATCH_COMPRESSION) is not None


def _table(buffer: bytes, position: int) -> tuple[int, int]:
    """A flatbuffer table at ``position``: (its position, its vtable's)."""
    return position, position - struct.unpack_from("<i", buffer, position)[0]


def _field(buffer: bytes, table: tuple[int, int], index: int) -> int | None:
    """Where field ``index`` of a flatbuffer table is, or None when it is absent."""
    position, vtable = table
    entry = 4 + 2 * index
    if entry >= struct.unpack_from("<H", buffer, vtable)[0]:
        return None
    offset = struct.unpack_from("<H", buffer, vtable + entry)[0]
    return position + offset if offset else None
