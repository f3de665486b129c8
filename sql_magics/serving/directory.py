"""The directory: which functions and versions a session serves, told to its Serve replicas.

The serving session (its :class:`~sql_magics.serving.publisher.Publisher`) publishes a new revision
whenever a function is registered, swapped or removed. Each replica follows the directory (a long
poll: the answer comes as soon as a newer revision exists) and reports, with each poll, the revision
it runs on, the versions its requests in flight still use, and its metrics; the session keeps a
version's workers up until no replica can still answer with it. ``/run/script`` requests travel through it to the session, which runs
them and answers.

Example:
    >>> directory = ray.remote(Directory).options(name="rayudf.ab12.serve", num_cpus=0).remote()   # doctest: +SKIP
    >>> ray.get(directory.publish.remote({"digit": entry}))                                   # doctest: +SKIP
    1
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from udf_engine.ray_runtime import actor_name


def app_directory_name(app: str | None = None) -> str:
    """The name of a deployed app's directory (``rayudf deploy``): from the app's name, which a replica
    of the app reads from Serve's context when ``app`` is None.

    Example:
        >>> app_directory_name("scores")
        'rayudf.app.scores'
    """
    if app is None:
        from ray import serve

        app = serve.get_replica_context().app_name
    return actor_name("app", app)


# How long a replica's follow() waits for a newer revision before it answers "no change": also how
# often a replica reports at the least, so a replica silent for REPLICA_SILENT_S is gone.
FOLLOW_WAIT_S = 0.5
REPLICA_SILENT_S = 10.0


@dataclass(frozen=True)
class VersionEntry:
    """One version of a served function, as a replica calls it."""

    key: str  # unique within the session: replicas report what they use by it
    label: str  # the version label answers carry
    share: float  # of requests it answers
    master: Any  # the UDFMaster handle: workers (and their replacements) are asked of it
    conf: Any  # the UDF's UDFConf
    model_refs: list  # the model's rows, handed to the master with a replacement
    width: int | None  # values per input row, when the model says so
    workers: int


@dataclass(frozen=True)
class FunctionEntry:
    """A served function: its result type and its versions (one, or a current one and a canary)."""

    name: str
    returns: str
    kind: str
    versions: tuple[VersionEntry, ...]
    max_batch_size: int
    batch_wait_timeout_s: float

    @property
    def signature(self) -> tuple:
        """What tells two entries of a function apart for a replica."""
        versions = tuple((v.key, v.share) for v in self.versions)
        return self.returns, versions, self.max_batch_size, self.batch_wait_timeout_s


@dataclass
class _Report:
    revision: int
    busy: frozenset[str]  # keys of versions with requests in flight
    metrics: dict
    at: float = field(default_factory=time.monotonic)


class Directory:
    """An async Ray actor owned by the serving session."""

    def __init__(self) -> None:
        self._revision = 0  # bumped by each publish
        self._functions: dict[str, FunctionEntry] = {}
        self._starting: tuple[str, ...] = ()  # functions to come (an owner running its script): replicas answer 503 for them
        self._changed = asyncio.Condition()
        self._reports: dict[str, _Report] = {}  # by replica id
        self._scripts: asyncio.Queue = asyncio.Queue()  # (job id, request) for the session to run
        self._answers: dict[int, asyncio.Future] = {}
        self._jobs = itertools.count(1)

    async def publish(self, functions: dict[str, FunctionEntry], starting: list[str] | tuple[str, ...] = ()) -> int:
        """The session's functions now, and the names of those still to come (``starting``); returns their revision."""
        async with self._changed:
            self._revision += 1
            self._functions, self._starting = dict(functions), tuple(starting)
            self._changed.notify_all()
            return self._revision

    async def follow(
        self, known: int, replica: str, busy: list[str], metrics: dict
    ) -> tuple[int, dict[str, FunctionEntry], tuple[str, ...]] | None:
        """A replica's poll: (revision, functions, names still to come) once newer than ``known`` (None after
        FOLLOW_WAIT_S without one). A replica that lost its directory asks with ``known`` 0: this one's news."""
        self._reports[replica] = _Report(known, frozenset(busy), metrics)
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._revision > known), FOLLOW_WAIT_S)
            except TimeoutError:
                return None
            return self._revision, dict(self._functions), self._starting

    def reports(self) -> dict[str, tuple[int, frozenset[str]]]:
        """What each replica heard from recently says: (revision it runs on, keys of versions it still uses)."""
        now = time.monotonic()
        return {r: (rep.revision, rep.busy) for r, rep in self._reports.items() if now - rep.at < REPLICA_SILENT_S}

    def metrics(self) -> dict[str, dict]:
        """The metrics snapshots of the replicas heard from recently, by replica id."""
        now = time.monotonic()
        return {r: rep.metrics for r, rep in self._reports.items() if now - rep.at < REPLICA_SILENT_S}

    async def run_script(self, request: dict) -> dict:
        """A replica's ``/run/script``: queued for the session, answered when it has run."""
        job = next(self._jobs)
        answer = asyncio.get_running_loop().create_future()
        self._answers[job] = answer
        await self._scripts.put((job, request))
        try:
            return await answer
        finally:
            self._answers.pop(job, None)

    async def next_script(self, wait_s: float) -> tuple[int, dict] | None:
        """The session's poll for a script to run (None after ``wait_s`` without one)."""
        try:
            return await asyncio.wait_for(self._scripts.get(), wait_s)
        except TimeoutError:
            return None

    def answer(self, job: int, result: dict) -> None:
        """The session's answer to a script."""
        future = self._answers.get(job)
        if future is not None and not future.done():
            future.set_result(result)
