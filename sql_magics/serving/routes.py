"""A replica's routes: a method and a path to a method of the deployment, as a bare ASGI app.

Under load, small requests are bound by the replica's CPU per request, and a framework's routing
and middleware buy nothing here (FastAPI's took about 40% of a 1-row request's CPU in the replica):
every endpoint reads its own body and answers its own errors. So a request is one dictionary look-up away from its method. A
path's last segment may be a parameter (``/v1/functions/{name}``: one segment, passed by name).

Example:
    >>> routes = Routes()
    >>> @routes.route("/v1/functions/{name}", "POST")
    ... async def call(owner, request, name): ...
    >>> routes.find("POST", "/v1/functions/digit")[1], routes.find("GET", "/v1/functions/digit")[0].status_code
    ({'name': 'digit'}, 405)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

Handler = Callable[..., Awaitable[Response]]
_log = logging.getLogger("ray.serve.rayudf")
# Starlette's JSON, with an encoder made once: json.dumps with options makes one per call, a tenth of a small answer's cost.
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


class JSONAnswer(JSONResponse):
    r"""A JSON answer, as Starlette's ``JSONResponse`` renders it.

    Example:
        >>> JSONAnswer({"outputs": [1.5, None], "text": "é"}).body
        b'{"outputs":[1.5,null],"text":"\xc3\xa9"}'
    """

    def render(self, content: Any) -> bytes:
        return _encode(content).encode()


class Routes:
    """The routes of a deployment class, declared on its methods; :meth:`app` serves them for one instance."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}  # path -> method -> handler
        self._last_segment: dict[str, tuple[str, dict[str, Handler]]] = {}  # prefix ("/v1/functions/") -> (parameter, methods)

    def route(self, path: str, *methods: str) -> Callable[[Handler], Handler]:
        """``@routes.route("/healthz", "GET")``: the method answers ``path`` for ``methods``."""

        def register(handler: Handler) -> Handler:
            prefix, brace, parameter = path.partition("{")
            if brace:
                table = self._last_segment.setdefault(prefix, (parameter.rstrip("}"), {}))[1]
            else:
                table = self._exact.setdefault(path, {})
            for method in methods:
                table[method] = handler
            return handler

        return register

    def find(self, method: str, path: str) -> tuple[Handler | Response, dict[str, str]]:
        """The handler of ``method`` at ``path`` and its path parameters, or the 404 or 405 answer."""
        params: dict[str, str] = {}
        table = self._exact.get(path)
        if table is None:
            prefix, _, segment = path.rpartition("/")
            parameter, table = self._last_segment.get(f"{prefix}/", ("", None))
            if table is None or not segment:
                return JSONAnswer({"error": f"no endpoint at {path}"}, status_code=404), params
            params = {parameter: segment}
        handler = table.get(method)
        if handler is None:
            allowed = ", ".join(sorted(table))
            return JSONAnswer({"error": f"{path} takes {allowed}, not {method}"}, status_code=405, headers={"Allow": allowed}), params
        return handler, params

    def app(self, owner: Any) -> Callable[..., Awaitable[None]]:
        """The ASGI app that answers with ``owner``'s methods (what Serve's ``__serve_build_asgi_app__`` returns)."""

        async def asgi(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
                return
            if scope["type"] != "http":
                return  # a websocket: refused (closed unanswered)
            found, params = self.find(scope["method"], _route_path(scope))
            if isinstance(found, Response):
                await found(scope, receive, send)
                return
            try:
                response = await found(owner, Request(scope, receive), **params)
            except Exception:  # noqa: BLE001 - a fault of ours the handler did not answer: logged, a bare 500
                _log.exception("%s %s failed", scope["method"], scope["path"])
                response = JSONAnswer({"error": "internal error; the server's log has it"}, status_code=500)
            await response(scope, receive, send)

        return asgi


def _route_path(scope: dict) -> str:
    """The request's path below the app's route prefix (Serve puts the prefix in ``root_path``).

    Example:
        >>> _route_path({"path": "/scores/healthz", "root_path": "/scores"}), _route_path({"path": "/healthz"})
        ('/healthz', '/healthz')
    """
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


async def _lifespan(receive: Callable, send: Callable) -> None:
    """ASGI's start-up and shut-down, which need nothing here (the deployment's constructor did it all)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
