"""The serve options, once: `rayudf serve`'s flags, ``!serve key=value``, ``Session.serve``'s keywords and
docs/serving.md all read :data:`SERVE_OPTIONS`, and :func:`read_serve_options` is the one place a server's
token falls back to ``$RAYUDF_TOKEN``.

Example:
    >>> read_serve_options({"port": "8001", "allow_scripts": "yes", "token": "s3cret"})
    ServeOptions(host='127.0.0.1', port=8001, token='s3cret', allow_scripts=True, replicas=1, request_timeout_s=60.0)
    >>> read_serve_options({"prot": "8001"})
    Traceback (most recent call last):
    udf_engine.errors.ConfigError: serve: option 'prot' is not supported here (supported: host, port, token, allow_scripts, ...)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from udf_engine.errors import ConfigError
from udf_engine.settings import Option, read_options

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
TOKEN_VARIABLE = "RAYUDF_TOKEN"  # where a server finds its token when none is given
# Seconds Ray Serve's proxy lets a request run before it answers 408.
REQUEST_TIMEOUT_S = 60.0
_HIGHEST_PORT = 65535

SERVE_OPTIONS: tuple[Option, ...] = (
    Option("host", DEFAULT_HOST, str, "the address to bind; beyond loopback needs a token"),
    Option("port", DEFAULT_PORT, int, "the HTTP port"),
    Option("token", None, str, f"the token requests but /healthz must carry (Authorization: Bearer ...); none given: ${TOKEN_VARIABLE}"),
    Option("allow_scripts", False, bool, "answer Byzer's /run/script (a script can read files and run Python); needs a token"),
    Option("replicas", 1, int, "Serve replicas of the HTTP app"),
    Option("request_timeout_s", REQUEST_TIMEOUT_S, float, "seconds a request may take (then 408)"),
)


@dataclass(frozen=True)
class ServeOptions:
    """A server's options, read and checked: one field per entry of :data:`SERVE_OPTIONS`, in its order."""

    host: str
    port: int
    token: str | None
    allow_scripts: bool
    replicas: int
    request_timeout_s: float

    def __post_init__(self) -> None:
        if not 0 < self.port <= _HIGHEST_PORT:
            raise ConfigError(f"serve: port must be 1 to {_HIGHEST_PORT}, got {self.port}")
        if self.replicas < 1:
            raise ConfigError(f"serve: replicas must be at least 1, got {self.replicas}")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"serve: request_timeout_s must be positive, got {self.request_timeout_s:g}")


def read_serve_options(given: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> ServeOptions:
    """``given`` (strings or values, by option name) typed and checked, each missing one at its default,
    and no token given (or an empty one) taken from ``$RAYUDF_TOKEN``."""
    values = read_options(given, SERVE_OPTIONS, "serve")
    values["token"] = values["token"] or environ.get(TOKEN_VARIABLE) or None
    return ServeOptions(**values)


def with_serve_keywords(method: Callable) -> Callable:
    """``method(self, **options)`` shown with one keyword per serve option (``help()``, a notebook's signature hint)."""
    keywords = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default) for o in SERVE_OPTIONS]
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = inspect.Signature([self, *keywords], return_annotation=inspect.signature(method).return_annotation)
    return method
