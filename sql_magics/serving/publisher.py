"""What a session's HTTP replicas are told: its model functions, published in a directory actor.

A :class:`Publisher` makes the directory (:mod:`sql_magics.serving.directory`, a named actor the
replicas find by name), publishes the session's functions to it, and publishes again after every
registration, swap and removal. Each version it publishes is leased (its workers stay) until no
replica can still answer with it: each replica reports the versions its requests in flight use.
It also runs the ``/run/script`` requests the replicas pass on, in the session.

``rayudf serve`` (:mod:`sql_magics.serving.server`) and a deployed app's owner
(:mod:`sql_magics.front.deploy`) publish with it.

Example:
    >>> publisher = Publisher(registry, "rayudf.ab12.serve", run_script=lambda sql, owner: None)   # doctest: +SKIP
    >>> publisher.start()                                                                           # doctest: +SKIP
    >>> with publisher.starting(["digit"]):   # replicas answer 503 for digit until it is registered  # doctest: +SKIP
    ...     session.sql("register sklearn.`digit.pkl` as digit")
    >>> publisher.stop()                                                                            # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
import pyarrow as pa

from sql_magics.errors import ExecutionError, ParseError
from sql_magics.models.registry import FunctionRegistry
from sql_magics.serving.directory import Directory, FunctionEntry, VersionEntry
from sql_magics.serving.requests import rows_json
from udf_engine.errors import ConfigError, RayUDFError
from udf_engine.ray_runtime import NAMESPACE
from udf_engine.settings import as_bool

# How long a registration waits for the replicas to answer with it: they hear of it at once and
# only ask the new version's master for its workers; a replica that takes longer is slow or gone.
HEARD_TIMEOUT_S = 10.0
_HEARD_POLL_S = 0.02
# How often the publisher looks at the replicas' reports (to let old versions go) and for scripts to run.
_TEND_S = 0.25
# How long a directory waits for its name while the directory of a previous owner is being let go.
_NAME_WAIT_S = 60.0
_log = logging.getLogger(__name__)


class Publisher:
    """The directory of one session's served functions, kept up to date while it runs."""

    def __init__(
        self, registry: FunctionRegistry, directory_name: str, *, run_script: Callable[[str, str | None], pd.DataFrame | None]
    ) -> None:
        self._registry = registry
        self.directory_name = directory_name  # the replicas find the directory by it, in NAMESPACE
        self._run_script = run_script  # (sql, owner or None) -> the last statement's rows
        self.directory: Any = None
        self._keys: dict[int, tuple[Any, str]] = {}  # id(Version) -> (version, key): the versions leased
        self._removed: dict[str, int] = {}  # keys of leased versions no longer published -> the revision that dropped them
        self._serial = 0  # numbers the version keys
        self._starting: frozenset[str] = frozenset()  # functions to come, not yet registered: replicas answer 503 for them
        self._unconfirmed: tuple[int, str] | None = None  # (revision, warning) while some replica has not confirmed it
        self._lock = threading.Lock()  # guards _keys, _removed, _serial, _starting and _unconfirmed
        self._publishing = threading.Lock()  # one publish at a time, so revisions follow the registry's order
        self._stopping = threading.Event()
        self._tender: threading.Thread | None = None

    @property
    def warning(self) -> str:
        """Why the newest change of the served functions is not known to be served by every replica ("" when it is)."""
        with self._lock:
            return self._unconfirmed[1] if self._unconfirmed else ""

    def start(self, starting: Iterable[str] = ()) -> None:
        """Make the directory, publish the functions (and ``starting``, see :meth:`starting`), and publish again
        at every change of them."""
        self._stopping.clear()
        self._starting = frozenset(starting)
        self.directory = _named_directory(self.directory_name)
        self.publish()
        self._registry.watch(self.publish)
        self._tender = threading.Thread(target=self._tend, name="rayudf-publisher", daemon=True)
        self._tender.start()

    @contextmanager
    def starting(self, names: Iterable[str]) -> Iterator[None]:
        """While the block runs (a script registering them), the functions ``names`` not yet registered are
        published as still to come: replicas answer 503, "restarting", for them rather than 404."""
        with self._lock:
            self._starting = frozenset(names)
        self.publish()
        try:
            yield
        finally:
            with self._lock:
                self._starting = frozenset()
            self.publish()

    def stop(self) -> None:
        """Stop publishing, let go of every leased version and of the directory."""
        try:
            self._registry.unwatch(self.publish)
        except ValueError:
            pass  # not watching yet
        self._stopping.set()
        if self._tender is not None:
            self._tender.join()
            self._tender = None
        with self._lock:
            leased, self._keys, self._removed = [v for v, _ in self._keys.values()], {}, {}
            self._unconfirmed = None
        for version in leased:
            version.leave()
        if self.directory is not None:
            import ray

            ray.kill(self.directory)
            self.directory = None

    # -- what the replicas are told --------------------------------------------------------

    def publish(self) -> None:
        """Tell the replicas the session's functions now; lease the versions they may use."""
        with self._publishing:
            self._publish_now()

    def _publish_now(self) -> None:
        import ray

        entries: dict[str, FunctionEntry] = {}
        published: set[str] = set()
        registered = self._registry.functions
        for name, fn in self._registry.model_functions().items():
            versions = tuple(self._entry(version, share) for version, share in fn.live_versions())
            published |= {v.key for v in versions}
            conf = registered[name].udf.conf  # the newest registration's serving options
            entries[name] = FunctionEntry(
                name, fn.return_type, registered[name].kind, versions, conf.max_batch_size, conf.batch_wait_timeout_s
            )
        with self._lock:
            starting = sorted(self._starting - set(entries))
        revision = ray.get(self.directory.publish.remote(entries, starting))
        with self._lock:
            for _, key in self._keys.values():
                if key not in published:
                    self._removed.setdefault(key, revision)
        self._wait_heard(revision)

    def _wait_heard(self, revision: int) -> None:
        """Return once every replica answers with ``revision`` (a registration is served when it returns);
        after HEARD_TIMEOUT_S, say that some do not: a warning logged, and in ``!serve status`` until they do."""
        import ray

        deadline = time.monotonic() + HEARD_TIMEOUT_S
        while True:
            reports = ray.get(self.directory.reports.remote())
            behind = sum(seen < revision for seen, _ in reports.values())
            if not behind or time.monotonic() >= deadline:
                break
            time.sleep(_HEARD_POLL_S)
        warning = ""
        if behind:
            warning = (
                f"serve: {behind} of {len(reports)} replicas did not confirm the newest change of the served functions (a "
                f"registration, swap or removal) within {HEARD_TIMEOUT_S:g} s; until they do, they answer with what they had before"
            )
            _log.warning(warning)
        with self._lock:
            self._unconfirmed = (revision, warning) if warning else None

    def _confirmed(self, reports: dict[str, tuple[int, frozenset[str]]]) -> None:
        """Forget the warning of a change once every replica heard from recently runs on it (or a newer one)."""
        with self._lock:
            if self._unconfirmed and all(seen >= self._unconfirmed[0] for seen, _ in reports.values()):
                self._unconfirmed = None

    def _entry(self, version: Any, share: float) -> VersionEntry:
        with self._lock:
            if id(version) not in self._keys:
                self._serial += 1
                version.enter()  # a lease: its workers stay while replicas may answer with it
                self._keys[id(version)] = (version, f"{version.udf.function}#{self._serial}")
            key = self._keys[id(version)][1]
        udf = version.udf
        return VersionEntry(key, version.label, share, udf.master, udf.conf, udf.model_refs, version.width, udf.conf.workers)

    # -- tending: old versions let go, scripts run -----------------------------------------

    def _tend(self) -> None:
        import ray

        while not self._stopping.is_set():
            try:
                job = ray.get(self.directory.next_script.remote(_TEND_S))
                reports = ray.get(self.directory.reports.remote())
            except ray.exceptions.RayError:
                if self._stopping.wait(_TEND_S):
                    return
                continue
            if job is not None:
                threading.Thread(target=self._answer_script, args=job, name="rayudf-script", daemon=True).start()
            self._let_go(reports)
            self._confirmed(reports)

    def _let_go(self, reports: dict[str, tuple[int, frozenset[str]]]) -> None:
        """End the leases of versions no replica can still use."""
        with self._lock:
            done = [
                key for key, revision in self._removed.items()
                if all(seen >= revision and key not in busy for seen, busy in reports.values())
            ]
            gone = [(i, v) for i, (v, key) in self._keys.items() if key in done]
            for i, _ in gone:
                del self._keys[i]
            for key in done:
                del self._removed[key]
        for _, version in gone:
            version.leave()

    def _answer_script(self, job: int, request: dict) -> None:
        self.directory.answer.remote(job, script_answer(request, self._run_script))


def _named_directory(name: str) -> Any:
    """A new Directory actor named ``name``; while an earlier one of that name is still being let go
    (its owner died a moment ago: Ray frees the name when the actor is gone), the name is waited for."""
    import ray

    deadline = time.monotonic() + _NAME_WAIT_S
    while True:
        try:
            return ray.remote(Directory).options(name=name, namespace=NAMESPACE, num_cpus=0).remote()
        except ValueError:  # the name is taken
            if time.monotonic() > deadline:
                raise ConfigError(f"serve: an actor named {name} still runs after {_NAME_WAIT_S:g} s (a server of that name?)") from None
            time.sleep(0.5)


def script_answer(request: dict, run: Callable[[str, str | None], pd.DataFrame | None]) -> dict:
    """Byzer's ``/run/script`` answer: the last statement's rows (``[]`` for none), with their schema
    when ``includeSchema`` is true; ``owner`` with ``sessionPerUser`` runs in that owner's own session.

    Example:
        >>> answer = script_answer({"sql": "select 1 as x", "includeSchema": "true"}, lambda sql, owner: pd.DataFrame({"x": [1]}))
        >>> answer["status"], answer["body"]["data"], answer["body"]["schema"]["fields"][0]["type"]
        (200, [{'x': 1}], 'int64')
    """
    sql = str(request.get("sql") or "")
    if not sql.strip():
        return {"status": 400, "body": {"error": "/run/script: the sql parameter (the script) is required"}}
    try:
        per_user, with_schema = (as_bool(request.get(name) or False, name) for name in ("sessionPerUser", "includeSchema"))
    except ConfigError as err:
        return {"status": 400, "body": {"error": f"/run/script: {err}"}}
    owner = str(request.get("owner") or "admin") if per_user else None
    try:
        frame = run(sql, owner)
        table = pa.table({}) if frame is None else pa.Table.from_pandas(frame, preserve_index=False)
        rows = rows_json(table)
    except (ParseError, ExecutionError, RayUDFError) as err:
        if not isinstance(err, ParseError):
            _log.error("/run/script answers 500: the script failed", exc_info=err)
        return {"status": 400 if isinstance(err, ParseError) else 500, "body": {"error": str(err)}}
    except BaseException as err:  # noqa: BLE001 - SystemExit, a result Arrow cannot hold: still an answer, never a lost request
        _log.error("/run/script answers 500: running the script raised", exc_info=err)
        return {"status": 500, "body": {"error": f"/run/script: {type(err).__name__}: {err}"}}
    if not with_schema:
        return {"status": 200, "body": rows}
    fields = [{"name": f.name, "type": str(f.type), "nullable": True} for f in table.schema]
    return {"status": 200, "body": {"schema": {"type": "struct", "fields": fields}, "data": rows}}
