"""The contexts MLSQL/Byzer Python code runs in: ``RayContext`` and ``PythonContext``.

A :class:`RayContext` is MLSQL's ``ray_context``. For ``UDFBuilder.build`` it holds a
function's name, options (``.conf``) and model rows as object refs, and receives the
built UDF. For Byzer-python code it also holds the input table: ``data_servers()``
splits it into Arrow blocks in Ray's object store (readable by tasks on any node with
``RayContext.collect_from``), ``foreach``/``map_iter`` run a function over the blocks as
Ray tasks, and ``build_result`` leaves the output rows. A :class:`PythonContext` is the
``context`` global such code sees: ``.conf``, ``.build_result(rows)`` and its ray context.

Example:
    >>> import pyarrow as pa
    >>> context = PythonContext({"dataMode": "model"}, input_table=pa.table({"a": [1, 2]}))
    >>> ray_context = RayContext.connect({"context": context}, None)   # doctest: +SKIP
    >>> [row["a"] for row in context.rayContext.collect()]
    [1, 2]
    >>> context.build_result({"b": row["a"] * 10} for row in context.rayContext.collect())
    >>> list(context.output())
    [{'b': 10}, {'b': 20}]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from udf_engine.errors import ConfigError, remote_cause
from udf_engine.models import streaming_tar
from udf_engine.ray_runtime import RayRuntime, actor_name
from udf_engine.resources import WorkerResources
from udf_engine.settings import UDFConf

# An input block in the object store: large enough that a task's overhead is small next to
# reading it, small enough that a big table is many blocks that tasks read in parallel.
BLOCK_BYTES = 16 << 20
# The Ray address Byzer scripts give for "the Ray this code runs on".
_SESSION_ADDRESSES = (None, "", "local")


@dataclass(frozen=True)
class DataServer:
    """One block of the input table in Ray's object store: what Byzer's data servers serve."""

    block: Any  # ray.ObjectRef of a pyarrow.Table
    rows: int


def _block_rows(servers: DataServer | Iterable[DataServer]) -> Iterator[dict]:
    import ray

    for server in [servers] if isinstance(servers, DataServer) else servers:
        table: pa.Table = ray.get(server.block)
        for batch in table.to_batches():
            yield from batch.to_pylist()


def _run_on_block(func: Callable, block: pa.Table, per_row: bool, names: Callable[[], AbstractContextManager]) -> list:
    """Inside a Ray task: ``func`` over one block's rows (per row or as an iterator), under the import ``names``."""
    rows = block.to_pylist()
    with names():
        if per_row:
            return [out for out in (func(row) for row in rows) if out is not None]
        return list(func(iter(rows)))


@dataclass
class RayContext:
    """Everything one ``UDFBuilder.build`` call or one Byzer-python script needs.

    ``conf`` holds the options of the registration or command (from scripts, the
    ``!python conf`` values too); ``model_refs`` the model table's rows as object refs;
    ``input_table`` the table a script reads; ``python_context`` where its output goes;
    ``names`` what the functions that ``foreach``/``map_iter`` ship run under in their tasks
    (for Byzer code, ``udf_engine.byzer.pyjava_compat.pyjava_modules``: the ``pyjava`` import names).
    """

    function: str
    conf: dict = field(default_factory=dict)
    settings: UDFConf | None = None  # the engine's settings, typed when the registration was read (None: read from conf)
    model_refs: list = field(default_factory=list)
    actor_prefix: str = ""
    runtime: RayRuntime | None = None
    warm_pool: str = ""  # the name of the session's warm pool actor (udf_engine.actors.warm_pool), "" for none
    row_wise: bool = False  # apply_func is written for one row (MLSQL); build() wraps it
    udf: Any = None  # the RemoteUDF that build() made
    input_table: pa.Table | None = None
    python_context: PythonContext | None = None
    names: Callable[[], AbstractContextManager] = nullcontext
    _servers: list[DataServer] | None = field(default=None, repr=False)  # input blocks, once put

    def __post_init__(self) -> None:
        if not self.actor_prefix:
            self.actor_prefix = actor_name(self.function)

    @staticmethod
    def connect(namespace: dict | Any, url: str | None = None, **_: Any) -> RayContext:
        """MLSQL's ``RayContext.connect(globals(), url)``: the ray context of the code's ``context``.

        ``url`` None (or "local") means the session's Ray. Another address is joined when the
        session has no Ray yet; when it has one elsewhere, that is an error naming both.
        """
        context = namespace.get("context") if isinstance(namespace, dict) else namespace
        ray_context = context.rayContext if isinstance(context, PythonContext) else context
        if not isinstance(ray_context, RayContext):
            raise ConfigError("RayContext.connect: no rayudf context in these globals (the code must be run by rayudf)")
        if ray_context.runtime is None:
            ray_context.runtime = RayRuntime()
        ray_context.runtime.join(None if url in _SESSION_ADDRESSES else url)
        return ray_context

    def _ray(self) -> Any:
        """The ray module, connected (to the session's Ray unless connect() said otherwise)."""
        import ray

        if self.runtime is not None:
            self.runtime.ensure()
        return ray

    # -- the input table -------------------------------------------------------------

    def _input(self) -> pa.Table:
        return self.input_table if self.input_table is not None else pa.table({})

    def data_servers(self) -> list[DataServer]:
        """The input table as blocks in the object store: pass them to Ray tasks, read them with collect_from."""
        if self._servers is None:
            ray = self._ray()
            table = self._input()
            cpus = int(ray.cluster_resources().get("CPU", 1))
            blocks = max(1, min(table.num_rows, max(math.ceil(table.nbytes / BLOCK_BYTES), cpus)))
            size = math.ceil(table.num_rows / blocks) if table.num_rows else 0
            pieces = [table.slice(start, size) for start in range(0, table.num_rows, size)] if size else []
            self._servers = [DataServer(ray.put(piece), piece.num_rows) for piece in pieces]
        return self._servers

    @staticmethod
    def collect_from(servers: DataServer | Iterable[DataServer]) -> Iterator[dict]:
        """The rows of some blocks as dicts, in order; works in any Ray task or the driver."""
        return _block_rows(servers)

    def collect(self) -> Iterator[dict]:
        """The input table's rows as dicts."""
        for batch in self._input().to_batches():
            yield from batch.to_pylist()

    def to_pandas(self) -> Any:
        """The input table as a pandas DataFrame."""
        return self._input().to_pandas()

    def to_dataset(self) -> Any:
        """The input table as a Ray Dataset over its blocks (``.to_dask()`` needs dask)."""
        import ray.data

        return ray.data.from_arrow_refs([server.block for server in self.data_servers()])

    def fetch_as_dir(self, target_dir: str, servers: Iterable[DataServer] | None = None) -> None:
        """Write the input's ``streaming_tar`` chunk rows back to files under ``target_dir``."""
        streaming_tar.save_rows_as_file(RayContext.collect_from(servers or self.data_servers()), target_dir)

    # -- distributed processing --------------------------------------------------------

    def foreach(self, func_for_row: Callable[[dict], dict | None]) -> None:
        """Run ``func_for_row`` on every input row in Ray tasks; its results are the output (None drops a row)."""
        self._run(func_for_row, per_row=True)

    def map_iter(self, func_for_rows: Callable[[Iterator[dict]], Iterable[dict]]) -> None:
        """Run ``func_for_rows`` over each block's rows in Ray tasks; what it yields is the output."""
        self._run(func_for_rows, per_row=False)

    def _run(self, func: Callable, *, per_row: bool) -> None:
        ray = self._ray()
        task = ray.remote(_run_on_block).options(**WorkerResources.of(UDFConf.from_options(self.conf)).task_options())
        refs = [task.remote(func, server.block, per_row, self.names) for server in self.data_servers()]
        try:
            blocks = ray.get(refs)
        except ray.exceptions.RayTaskError as err:
            raise remote_cause(err) from None
        self.build_result(row for block in blocks for row in block)

    # -- the output --------------------------------------------------------------------

    def build_result(self, items: Iterable[dict] | Any, block_size: int = 1024) -> None:
        """Make ``items`` (dicts, or a pandas DataFrame) the output table."""
        self._output_context().build_result(items, block_size)

    def build_result_from_dir(self, target_path: str) -> None:
        """Make a directory's ``streaming_tar`` chunk rows the output table."""
        self._output_context().build_result_from_dir(target_path)

    def _output_context(self) -> PythonContext:
        if self.python_context is None:
            raise ConfigError(f"{self.function}: build_result needs a PythonContext (code run for a table, not for a UDF)")
        return self.python_context


class PythonContext:
    """The ``context`` global of Byzer-python code: its options, its output, its ray context."""

    def __init__(
        self, conf: dict, *, input_table: pa.Table | None = None, name: str = "python", runtime: RayRuntime | None = None,
        names: Callable[[], AbstractContextManager] = nullcontext,
    ):
        self.conf = conf  # the !python conf values and the statement's options
        self.output_data: Any = None  # what build_result was given (None: nothing yet)
        self.rayContext = RayContext(name, conf=conf, runtime=runtime, input_table=input_table, python_context=self, names=names)

    def build_result(self, items: Iterable[dict] | Any, block_size: int = 1024) -> None:
        """Make ``items`` (dicts, or a pandas DataFrame) the output table; block_size is Byzer's, unused."""
        self.output_data = items

    def build_result_from_dir(self, target_dir: str, block_size: int = 1024) -> None:
        """Make a directory's ``streaming_tar`` chunk rows the output table."""
        self.build_result(streaming_tar.build_rows_from_file(target_dir), block_size)

    def output(self) -> Any:
        """What build_result was given."""
        return self.output_data

    def fetch_once_as_rows(self) -> Iterator[dict]:
        """The input table's rows as dicts."""
        return self.rayContext.collect()

    def fetch_once_as_dataframe(self) -> Iterator[Any]:
        """The input table as pandas DataFrames, one per Arrow batch."""
        for batch in self.rayContext._input().to_batches():
            yield batch.to_pandas()
