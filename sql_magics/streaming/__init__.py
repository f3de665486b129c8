"""The streaming mode: a Byzer stream script (``set streamName``) runs its selects over each micro-batch of a source into a sink.

checkpoint (what each batch read, and which batches committed) -> sources (files, Delta
versions, mockStream; read_errors tells a bad file from a read that may pass) -> sinks (Delta,
files, console, DuckDB tables) -> query (one stream's loop) -> streams (a session's streams:
``!streams``, ``!kill stream``) -> mode (what the executor asks: which statements of a script are
the stream's, and runs them). docs/streaming.md.
"""
