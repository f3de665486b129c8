"""The HTTP tier: a Ray Serve deployment that answers for a session's model functions (its routes: :mod:`sql_magics.serving.routes`).

Endpoints:
- ``GET|POST /model/predict``: Byzer's (``dataType``, ``data``, ``sql`` or ``pipeline``), as form
  fields, a query string or a JSON body; a JSON array of row objects.
- ``POST /v1/functions/{name}``: ``{"inputs": [[arg, ...], ...]}`` -> ``{"outputs": [...], "version": "2"}``,
  or an Arrow IPC stream in and out (``application/vnd.apache.arrow.stream``).
- ``GET /v1/functions``, ``GET /metrics`` (Prometheus text).
- ``GET /healthz`` (and ``/readyz``): 200 when every function has a live worker, else 503 (a probe's answer).
- ``GET|POST /run/script`` (Byzer's; only when the server allows scripts): runs in the session.

Every answer that scored rows carries the versions that served it (``X-RayUDF-Version: f=2``).
With a token, every endpoint but ``/healthz`` and ``/readyz`` wants ``Authorization: Bearer <token>``.
An answer never carries Ray's words (actor ids, pids, addresses) or a traceback: those go to the
replica's log. While a function's workers are gone (its owner restarting), calls of it answer 503
with ``Retry-After``.

Example:
    >>> serve.run(Ingress.bind("rayudf.ab12.serve", None, False, "127.0.0.1", 8000, 60.0), name="rayudf-ab12")   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import io
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import ray
from ray import serve
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from sql_magics.errors import ParseError
from sql_magics.serving.directory import app_directory_name
from sql_magics.serving.metrics import Metrics
from sql_magics.serving.openai_api import (
    DONE,
    GenerationRequest,
    answer_id,
    chat_answer,
    chat_request,
    chunk,
    completion_answer,
    completion_request,
    embeddings_answer,
    embeddings_request,
    error_body,
    event,
    models_answer,
    usage,
)
from sql_magics.serving.replica import Functions, Pins
from sql_magics.serving.requests import (
    MAX_BODY_BYTES,
    QueryStoppedError,
    RequestError,
    RestartingError,
    UnknownFunctionError,
    arrow_columns,
    inputs_arguments,
    loads,
    predict_request,
    rows_json,
    values_json,
)
from sql_magics.serving.routes import JSONAnswer, Routes
from udf_engine.errors import BatchTimeoutError, ModelError, RayUDFError, WorkerError
from udf_engine.models.loaders import PROMPT_INPUT, TEXT_INPUT
from udf_engine.ray_runtime import NAMESPACE

VERSION_HEADER = "X-RayUDF-Version"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
_EVERY_ADDRESS = ("0.0.0.0", "::", "")
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_SAME_ORIGIN = ("same-origin", "none")  # Sec-Fetch-Site of a page of this server, or of a typed URL or a client that is no page
# Requests one replica holds at once: enough that many are coalesced into one call to the workers.
MAX_ONGOING_REQUESTS = 256
# How long a replica that is told to stop lets its requests in flight finish (a slow model's batch),
# and how often it looks whether they have.
DRAIN_TIMEOUT_S = 30.0
DRAIN_POLL_S = 0.2
# After the directory cannot be reached (the session stopping, a deployed app's owner restarting), wait this long before asking again.
_DIRECTORY_RETRY_S = 1.0
# How long a replica's first request waits for the directory's first answer before it answers 503.
_FIRST_ANSWER_S = 10.0
# What a 503 tells the caller to wait (Retry-After), in seconds: an owner that came back registers its functions in some.
RETRY_AFTER_S = 5
# A replica whose directory is out of reach this long fails Serve's health check: Serve replaces it.
UNREACHABLE_S = 60.0
# After following the directory failed otherwise (a fault of ours: logged), wait this long, doubled at each failure in
# a row up to the most: the replica keeps trying to learn new versions, without filling its log with one error.
_FOLLOW_RETRY_S, _FOLLOW_RETRY_MOST_S = 1.0, 30.0
# Serve's logger: a replica's records go to its Serve log (logs/serve/replica_*.log), with the request's id.
_log = logging.getLogger("ray.serve.rayudf")

routes = Routes()


def _status(err: BaseException) -> int:
    """The HTTP status of an error: the caller's mistake, the model's, or the workers'."""
    if isinstance(err, UnknownFunctionError):
        return 404
    if isinstance(err, BatchTimeoutError | QueryStoppedError):
        return 504
    if isinstance(err, ModelError):
        return 422
    if isinstance(err, WorkerError | RestartingError | ray.exceptions.RayError):  # workers or their owner gone: they come back
        return 503
    if isinstance(err, RayUDFError | ParseError):
        return 400
    return 500


def error_answer(err: Exception, endpoint: str, *, openai: bool = False) -> JSONAnswer:
    """The answer to a request that raised: its own message for the caller's or the model's error; for a
    fault of the server (500), one line with the error's type and an id, the traceback logged under that id;
    for workers gone (503), ours ("function f is restarting") or a line with an id, and ``Retry-After``.
    ``openai``: in OpenAI's error shape."""
    status = _status(err)
    if status not in (500, 503):
        return _error(status, str(err) or type(err).__name__, openai=openai)
    incident = secrets.token_hex(4)
    if status == 503:  # Ray's words (actor ids, pids, addresses) are the log's, not the caller's
        _log.warning("%s answered 503 (error id %s)", endpoint, incident, exc_info=err)
        said = str(err) if isinstance(err, RestartingError) else f"the function's workers are restarting; try again (error id {incident})"
        answer = _error(503, said, openai=openai)
        answer.headers["Retry-After"] = str(RETRY_AFTER_S)
        return answer
    _log.error("%s answered 500 (error id %s)", endpoint, incident, exc_info=err)
    return _error(500, f"internal error ({type(err).__name__}); the server's log has it as error id {incident}", openai=openai)


def _error(status: int, message: str, *, openai: bool = False) -> JSONAnswer:
    return JSONAnswer(error_body(status, message) if openai else {"error": message}, status_code=status)


class DirectoryLost(Exception):  # noqa: N818 - a state, not a failure
    """The directory is out of reach: no actor of its name (a deployed app's owner restarting), or Ray says it is gone."""


async def follow_directory(
    ask: Callable[[int], Awaitable[tuple | None]], apply: Callable[..., Awaitable[None]], lose: Callable[[], None],
    revision: int, who: str,
) -> None:
    """A replica's follow of the directory, for its whole life: ``ask(revision)`` waits for news newer than
    ``revision`` (None: none yet), ``apply(*news[1:])`` takes them in. No error ends it: the directory out of
    reach is ``lose()``-t and asked again, from revision 0 (a new directory numbers anew), after
    _DIRECTORY_RETRY_S; any other error (taking news in included, which is then asked for again) is logged
    with its traceback and followed by a pause that grows while it fails."""
    pause = _FOLLOW_RETRY_S
    while True:
        try:
            try:
                news = await ask(revision)
            except (ray.exceptions.RayError, DirectoryLost):  # the session stopping, an owner restarting: no fault, ask again
                lose()
                revision = 0
                await asyncio.sleep(_DIRECTORY_RETRY_S)
                continue
            if news is not None:
                await apply(*news[1:])
                revision = news[0]
            pause = _FOLLOW_RETRY_S
        except Exception:  # noqa: BLE001 - a replica that stops following answers with old versions for ever: log, pause, go on
            _log.exception("%s: following the directory failed (it asks again in %g s): it answers with the versions it has", who, pause)
            await asyncio.sleep(pause)
            pause = min(2 * pause, _FOLLOW_RETRY_MOST_S)


class _Refused(Exception):  # noqa: N818 - an answer, not a failure
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def allowed_hosts(bound: str) -> frozenset[str] | None:
    """The host names a request may say it is for (its ``Host``, a browser's ``Origin``): the bound
    address and loopback's names; None (any) when bound to every address, which needs a token.

    Example:
        >>> sorted(allowed_hosts("127.0.0.1")), allowed_hosts("0.0.0.0")
        (['127.0.0.1', '::1', 'localhost'], None)
    """
    if bound in _EVERY_ADDRESS:
        return None
    return frozenset({bound.strip("[]").lower(), *_LOOPBACK_NAMES})


def _check_origin(request: Request, hosts: frozenset[str] | None, port: int) -> None:
    """Refuse a request from another machine (403), for another host name (a DNS-rebinding page: 421),
    or one a web page of another origin made a browser send (403): a browser says so in
    ``Sec-Fetch-Site`` on every request (a cross-site GET from an ``<img>`` carries no Origin), and in
    ``Origin`` on a POST. None of it when bound to every address (which needs a token)."""
    if hosts is None:
        return
    if not _from_this_machine(request):
        raise _Refused(403, f"this server answers this machine only (it is bound to {min(hosts)}), not {request.client.host}")
    host = _host_name(request.headers.get("host", ""))
    if host not in hosts:
        raise _Refused(421, f"this server answers for {', '.join(sorted(hosts))}, not for the host {host or '(none)'!r}")
    fetched_by = request.headers.get("sec-fetch-site")
    if fetched_by is not None and fetched_by not in _SAME_ORIGIN:
        raise _Refused(403, f"requests that web pages of other origins make are refused (Sec-Fetch-Site: {fetched_by})")
    origin = request.headers.get("origin")
    if origin is not None and not _ours(origin, hosts, port):
        raise _Refused(403, f"requests from web pages of other origins are refused (Origin {origin!r})")


def _from_this_machine(request: Request) -> bool:
    """Whether the request's peer is this machine: loopback, or the address it came in on. Behind Serve's
    proxy that is the caller the proxy took it from; with HAProxy, each replica answers HTTP on a port of
    its own that Ray binds on every address, which a caller on another machine could reach.

    Example:
        >>> _from_this_machine(Request({"type": "http", "client": ("10.0.0.9", 5000), "server": ("10.0.0.5", 8000)}))
        False
        >>> _from_this_machine(Request({"type": "http", "client": ("10.0.0.5", 5000), "server": ("10.0.0.5", 8000)}))
        True
    """
    peer, server = request.client, request.scope.get("server")
    if peer is None:
        return True  # no socket (an in-process call)
    loopback = _loopback(peer.host)
    return loopback or (loopback is not None and server is not None and peer.host == server[0])


# Requests come from few addresses for few host names: what each is, is looked up once, in bounded caches that
# keep only what is short enough to be an address or a name (a caller chooses its Host header).
_LONGEST_ADDRESS = 45  # IPv6's longest text
_LONGEST_HOST = 260  # a DNS name's 253 characters and a port


def _loopback(address: str) -> bool | None:
    """Whether an IP address is a loopback one (None: it is no IP address).

    Example:
        >>> _loopback("127.0.0.2"), _loopback("10.0.0.9"), _loopback("::1"), _loopback("example.com")
        (True, False, True, None)
    """
    return _loopback_address(address) if len(address) <= _LONGEST_ADDRESS else None


@functools.lru_cache(maxsize=1024)
def _loopback_address(address: str) -> bool | None:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return None


def _host_name(host: str) -> str | None:
    """The host name of a ``Host`` header (no port, lowercase), or None when it is none at all ("[").

    Example:
        >>> _host_name("LocalHost:8000"), _host_name("[::1]:8000"), _host_name("["), _host_name("a" * 300)
        ('localhost', '::1', None, None)
    """
    return _parsed_host(host) if len(host) <= _LONGEST_HOST else None


@functools.lru_cache(maxsize=1024)
def _parsed_host(host: str) -> str | None:
    try:
        return urlsplit(f"//{host}").hostname
    except ValueError:
        return None


def _ours(origin: str, hosts: frozenset[str], port: int) -> bool:
    try:
        parts = urlsplit(origin)
        return parts.hostname in hosts and parts.port == port and parts.scheme in ("http", "https")
    except ValueError:
        return False


# The helpers stand before the deployment class: Serve serializes the class, with what it names, as it is defined.
def _described(function) -> dict:
    return {
        "name": function.name,
        "kind": function.kind,
        "returns": function.returns,
        "inputs": {"width": function.versions[0][0].width},
        "versions": [{"version": c.label, "share": share, "workers": v.workers}
                     for (c, share), v in zip(function.versions, function.entry.versions, strict=True)],
    }


def _generates(function) -> bool:
    return function.versions[0][0].width == PROMPT_INPUT


def _embeds(function) -> bool:
    return function.versions[0][0].width == TEXT_INPUT and function.returns.rstrip().endswith("]")


async def _collected(events: AsyncIterator[dict]) -> dict:
    """A whole answer from its events: its text, and the usage of the last."""
    pieces, last = [], {}
    async for item in events:
        if "text" in item:
            pieces.append(item["text"])
        else:
            last = item
    return {**last, "text": "".join(pieces)}


async def _sse(ident: str, ask: GenerationRequest, first: dict, events: AsyncIterator[dict], *, chat: bool) -> AsyncIterator[bytes]:
    """A streamed answer as OpenAI's server-sent events: a chunk per piece of text, one with the finish
    reason, the usage if asked, ``[DONE]``; an error after the first event is an ``error`` event."""
    opened = False
    try:
        async for item in _chained(first, events):
            if "text" in item:
                yield event(chunk(ident, ask.model, chat=chat, text=item["text"], first=not opened))
                opened = True
                continue
            yield event(chunk(ident, ask.model, chat=chat, finish_reason=item["finish_reason"], first=not opened))
            if ask.usage_in_stream:
                yield event(chunk(ident, ask.model, chat=chat, used=usage(item["prompt_tokens"], item["completion_tokens"])))
        yield DONE
    except Exception as err:  # noqa: BLE001 - the status is sent: the error goes as an event
        yield event(json.loads(error_answer(err, "openai", openai=True).body))


async def _chained(first: dict, rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    yield first
    async for item in rest:
        yield item


async def _releasing(body: AsyncIterator[bytes], pins: Pins) -> AsyncIterator[bytes]:
    """A streamed body that lets go of its request's versions when it ends (or its client goes)."""
    try:
        async for part in body:
            yield part
    finally:
        pins.release()


async def _body(request: Request) -> bytes:
    """The body, counted as it arrives (a chunked one has no Content-Length to refuse it by): 413 at MAX_BODY_BYTES."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _Refused(413, f"the body is {int(declared):,} bytes; at most {MAX_BODY_BYTES:,} are taken")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise _Refused(413, f"the body is over {MAX_BODY_BYTES:,} bytes; at most {MAX_BODY_BYTES:,} are taken")
        chunks.append(part)
    return b"".join(chunks)


async def _params(request: Request, *, json_only: bool = False) -> dict[str, Any]:
    """A request's parameters: its query string, then its form fields or JSON object body (only a JSON
    POST with ``json_only``: what a web page of another site cannot send without the server's consent)."""
    kind = request.headers.get("content-type", "")
    if json_only and (request.method != "POST" or not kind.startswith("application/json")):
        raise _Refused(415, "this endpoint takes a POST with a JSON body (Content-Type: application/json)")
    params: dict[str, Any] = dict(request.query_params)
    if request.method != "POST":
        return params
    body = await _body(request)
    if kind.startswith("application/json"):
        fields = loads(body or b"{}", "the body")
        if not isinstance(fields, dict):
            raise RequestError("the JSON body must be an object of parameters")
        params.update(fields)
    elif kind.startswith(_FORMS):
        parser = FormParser if kind.startswith(_FORMS[0]) else MultiPartParser
        try:
            form = await parser(request.headers, _once(body), max_part_size=MAX_BODY_BYTES).parse()
        except MultiPartException as err:
            raise RequestError(f"the form body does not parse: {err.message}") from None
        params.update((k, v) for k, v in form.items() if isinstance(v, str))
    return params


async def _once(body: bytes) -> AsyncIterator[bytes]:
    """A body already read (and counted), as the stream a form parser reads."""
    yield body


def _arrow_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # a replica reserves nothing: the workers hold the cores
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    max_surge_percent=100,  # a changed app (its token, say) keeps its old replicas answering until the new ones are up
    graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
    graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
)
@serve.ingress()
class Ingress:
    """One replica of a session's HTTP tier."""

    def __init__(
        self, directory_name: str | None, token: str | None, allow_scripts: bool, host: str, port: int, request_timeout_s: float,
        owner: Any = None,
    ) -> None:
        # the Directory actor's name (in NAMESPACE), looked up again once it is lost; None: this deployed app's
        self._directory_name = directory_name or app_directory_name()
        self._directory: Any = None
        self._owner = owner  # a deployed app's Owner (sql_magics.front.deploy): bound here so that Serve deploys it with the app
        self._token = f"Bearer {token}".encode() if token else None
        self._allow_scripts = allow_scripts
        self._hosts = allowed_hosts(host)  # the names a request may say it is for (None: any)
        self._port = port  # the port of the origin a browser's page must have
        self._timeout_s = request_timeout_s  # how long a select list may run
        self._id = secrets.token_hex(4)  # how this replica reports to the directory
        self._metrics = Metrics()
        self._functions: Functions | None = None  # from the first request on
        self._heard: asyncio.Event | None = None  # set once the directory first answered, or was found out of reach
        self._following: asyncio.Task | None = None  # kept: the loop holds its tasks weakly, and its failure is logged

    def __serve_build_asgi_app__(self) -> Any:
        return routes.app(self)

    # -- following the directory -----------------------------------------------------------

    async def _ready(self) -> Functions:
        """The replica's functions, following the directory from the first request on (which waits for its first answer)."""
        if self._functions is None:
            self._functions, self._heard = Functions(asyncio.get_running_loop(), self._metrics), asyncio.Event()
            self._following = asyncio.get_running_loop().create_task(self._follow(self._functions, self._heard))
        if not self._heard.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(self._heard.wait()), _FIRST_ANSWER_S)
            except TimeoutError:
                pass  # still nothing: its requests answer 503
        return self._functions

    def _directory_actor(self) -> Any:
        if self._directory is None:
            try:
                self._directory = ray.get_actor(self._directory_name, namespace=NAMESPACE)
            except ValueError:
                raise DirectoryLost(self._directory_name) from None
        return self._directory

    async def _follow(self, functions: Functions, heard: asyncio.Event) -> None:
        async def ask(known: int) -> tuple | None:
            return await self._directory_actor().follow.remote(known, self._id, functions.in_use(), self._metrics.snapshot())

        async def apply(entries: Any, starting: Any) -> None:
            await asyncio.to_thread(functions.update, entries, starting)
            heard.set()

        def lose() -> None:
            self._directory = None
            functions.lose()
            heard.set()

        await follow_directory(ask, apply, lose, 0, f"replica {self._id}")

    async def check_health(self) -> None:
        """Serve's health check: a replica that has not reached its directory (and so its functions) for
        UNREACHABLE_S fails it, and Serve replaces it."""
        functions = self._functions
        if self._following is not None and self._following.done():
            raise RuntimeError("this replica stopped following its directory")
        if functions is not None and functions.lost_at is not None and time.monotonic() - functions.lost_at > UNREACHABLE_S:
            raise RuntimeError(f"this replica has not reached its directory {self._directory_name} for {UNREACHABLE_S:g} s")

    # -- answering -------------------------------------------------------------------------

    def _check(self, request: Request) -> None:
        _check_origin(request, self._hosts, self._port)
        if self._token is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(), self._token):
            raise _Refused(401, "this server needs Authorization: Bearer <token>")

    async def _answer(
        self, request: Request, endpoint: str, work: Callable[[Pins], Awaitable[Response]], *, scores: bool = True,
        openai: bool = False,
    ) -> Response:
        """``work(pins)``'s answer, or the error's (``openai``: in OpenAI's shape); timed and counted for
        /metrics. A streamed answer holds its versions until its last event is sent."""
        started = time.perf_counter()
        pins = held = None
        try:
            self._check(request)
            functions = await self._ready()
            pins = held = functions.pins()
            response = await work(pins)
            if scores and pins.chosen:
                response.headers[VERSION_HEADER] = pins.versions()
            if isinstance(response, StreamingResponse):
                response.body_iterator, held = _releasing(response.body_iterator, pins), None
        except _Refused as err:
            response = _error(err.status, str(err), openai=openai)
        except Exception as err:  # noqa: BLE001 - every error is an answer: the server never dies of a request
            response = error_answer(err, endpoint, openai=openai)
        finally:
            if held is not None:
                held.release()
        function = ",".join(sorted(pins.chosen)) if pins is not None else ""
        self._metrics.request(function, endpoint, response.status_code, time.perf_counter() - started)
        return response

    @routes.route("/healthz", "GET")
    @routes.route("/readyz", "GET")
    async def healthz(self, request: Request) -> Response:
        """200 while every function has a live worker; 503 (with Retry-After) while one has none, is still to
        come, or the directory is out of reach: a load balancer's or Kubernetes' probe."""
        try:
            _check_origin(request, self._hosts, self._port)
            ok, body = await (await self._ready()).health()
        except _Refused as err:
            return JSONAnswer({"error": str(err)}, status_code=err.status)
        except Exception as err:  # noqa: BLE001 - an answer, logged, as every endpoint's
            return error_answer(err, "healthz")
        if ok:
            return JSONAnswer(body)
        return JSONAnswer(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @routes.route("/v1/functions", "GET")
    async def list_functions(self, request: Request) -> Response:
        async def work(pins: Pins) -> Response:
            return JSONAnswer([_described(f) for f in self._functions.by_name.values()])

        return await self._answer(request, "functions", work, scores=False)

    @routes.route("/v1/functions/{name}", "POST")
    async def call_function(self, request: Request, name: str) -> Response:
        async def work(pins: Pins) -> Response:
            with pins.function(name).coalesced.coming():  # a call forming now waits for these rows
                body = await _body(request)
                arrow = request.headers.get("content-type", "").startswith(ARROW_STREAM)
                try:
                    arguments = arrow_columns(body) if arrow else inputs_arguments(body.decode())
                except UnicodeDecodeError:
                    raise RequestError(f"the body is not UTF-8 JSON (send Arrow with Content-Type: {ARROW_STREAM})") from None
                scored = await self._functions.score(name, arguments, pins)
            if request.headers.get("accept", "").startswith(ARROW_STREAM) or arrow:
                return Response(_arrow_bytes(pa.table({"output": scored.array})), media_type=ARROW_STREAM)
            return JSONAnswer({"outputs": values_json(scored.array), "version": pins.client(name).label})

        return await self._answer(request, "v1", work)

    @routes.route("/model/predict", "GET", "POST")
    async def predict(self, request: Request) -> Response:
        async def work(pins: Pins) -> Response:
            ask = predict_request(await _params(request))
            return JSONAnswer(rows_json(await self._functions.predict(ask, pins, self._timeout_s)))

        return await self._answer(request, "predict", work)

    # -- OpenAI's API (sql_magics.serving.openai_api) ------------------------------------------

    @routes.route("/v1/models", "GET")
    async def models(self, request: Request) -> Response:
        async def work(pins: Pins) -> Response:
            served = self._functions.by_name.values()
            return JSONAnswer(models_answer(sorted(f.name for f in served if _generates(f) or _embeds(f))))

        return await self._answer(request, "openai", work, scores=False, openai=True)

    @routes.route("/v1/chat/completions", "POST")
    async def chat_completions(self, request: Request) -> Response:
        async def work(pins: Pins) -> Response:
            return await self._generate(chat_request(loads(await _body(request), "the body")), pins, chat=True)

        return await self._answer(request, "openai", work, openai=True)

    @routes.route("/v1/completions", "POST")
    async def completions(self, request: Request) -> Response:
        async def work(pins: Pins) -> Response:
            return await self._generate(completion_request(loads(await _body(request), "the body")), pins, chat=False)

        return await self._answer(request, "openai", work, openai=True)

    @routes.route("/v1/embeddings", "POST")
    async def embeddings(self, request: Request) -> Response:
        async def work(pins: Pins) -> Response:
            model, texts, encoding = embeddings_request(loads(await _body(request), "the body"))
            if not _embeds(pins.function(model)):
                raise RequestError(f"{model} is not an embedding function (one that takes a text and returns FLOAT[d])")
            scored = await self._functions.score(model, [pa.array(texts, pa.string())], pins)
            return JSONAnswer(embeddings_answer(model, scored.array.to_pylist(), encoding))

        return await self._answer(request, "openai", work, openai=True)

    async def _generate(self, ask: GenerationRequest, pins: Pins, *, chat: bool) -> Response:
        """Answer a chat or completion request: each prompt through the continuous batch of a worker of
        the version the request chose; streamed as server-sent events when asked."""
        if not _generates(pins.function(ask.model)):
            raise RequestError(f"{ask.model} is not a generation function (register a causal LM with task='text-generation')")
        client, ident = pins.client(ask.model), answer_id("chatcmpl" if chat else "cmpl")
        if ask.stream:
            events = self._timed(ask.model, client.stream(ask.prompts[0], ask.params))
            first = await anext(events)  # a bad prompt or parameter is an error answer, not a broken stream
            return StreamingResponse(_sse(ident, ask, first, events, chat=chat), media_type="text/event-stream")
        answers = await asyncio.gather(*(_collected(self._timed(ask.model, client.stream(p, ask.params))) for p in ask.prompts))
        used = usage(sum(a["prompt_tokens"] for a in answers), sum(a["completion_tokens"] for a in answers))
        if chat:
            return JSONAnswer(chat_answer(ident, ask.model, answers[0]["text"], answers[0]["finish_reason"], used))
        return JSONAnswer(completion_answer(ident, ask.model, [(a["text"], a["finish_reason"]) for a in answers], used))

    async def _timed(self, function: str, events: AsyncIterator[dict]) -> AsyncIterator[dict]:
        """``events``, with the time to their first piece of text and the tokens generated counted for /metrics."""
        started = time.perf_counter()
        timed = False
        async for item in events:
            if not timed and "text" in item:
                self._metrics.first_token(function, time.perf_counter() - started)
                timed = True
            if "completion_tokens" in item:
                self._metrics.generated(function, item["completion_tokens"])
            yield item

    @routes.route("/metrics", "GET")
    async def metrics(self, request: Request) -> Response:
        async def work(pins: Pins) -> Response:
            try:
                others = await self._directory_actor().metrics.remote()
            except (ray.exceptions.RayError, DirectoryLost):  # an owner restarting: this replica's alone
                others = {}
            snapshots = {**others, self._id: self._metrics.snapshot()}  # this replica's now
            merged = Metrics.merged(list(snapshots.values()))
            for function in self._functions.by_name.values():
                if _generates(function):
                    stats = await asyncio.to_thread(function.versions[0][0].stats)
                    merged.sequences[function.name] = (sum(s.get("running", 0) for s in stats), sum(s.get("waiting", 0) for s in stats))
            return PlainTextResponse(merged.render(), media_type="text/plain; version=0.0.4")

        return await self._answer(request, "metrics", work, scores=False)

    @routes.route("/run/script", "GET", "POST")
    async def run_script(self, request: Request) -> Response:
        async def work(pins: Pins) -> Response:
            if not self._allow_scripts:
                raise _Refused(403, "/run/script is off: a script can read files and run Python; start the server with --allow-scripts")
            answer = await self._directory_actor().run_script.remote(await _params(request, json_only=True))
            return JSONAnswer(answer["body"], status_code=answer["status"])

        return await self._answer(request, "script", work, scores=False)
