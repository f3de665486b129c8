"""OpenAI's API over a session's text functions: what a request asks, and its answers in OpenAI's shapes.

``POST /v1/chat/completions`` and ``/v1/completions`` call a generation function (the request's
``model`` is its name), ``POST /v1/embeddings`` an embedding function, ``GET /v1/models`` lists
both. The official ``openai`` client works against ``rayudf serve`` with its ``base_url`` at
``http://host:port/v1`` and its API key the server's token. A request's ``max_tokens`` (or
``max_completion_tokens``), ``temperature``, ``top_p``, ``stop`` and ``seed`` become the row's
generation parameters; the fields OpenAI has and a local model has not (``logprobs``, ``tools``,
``user``...) are ignored, except ``n`` above 1, which is refused. ``stream: true`` is answered as
server-sent events, one chunk per piece of text, then ``data: [DONE]``.

Example:
    >>> ask = chat_request({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    >>> ask.model, ask.params["max_new_tokens"], ask.stream
    ('chat', 5, False)
    >>> error_body(404, "no function named 'gpt'")["error"]["type"]
    'invalid_request_error'
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sql_magics.serving.requests import RequestError

# OpenAI's request fields and the generation parameters they become.
_PARAMETERS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
               "top_p": "top_p", "stop": "stop", "seed": "seed"}
# Prompts one completion request may have: each is an answer generated beside the others.
MAX_PROMPTS = 256
# OpenAI's error types by status.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}
_ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found"}


@dataclass
class GenerationRequest:
    """A chat or completion request: the function, its prompts (messages, or texts), their parameters, whether to stream."""

    model: str
    prompts: list[Any]
    params: dict = field(default_factory=dict)
    stream: bool = False
    usage_in_stream: bool = False  # stream_options.include_usage: a last chunk with the usage


def _check_object(body: Any) -> None:
    if not isinstance(body, Mapping):
        raise RequestError("the body must be a JSON object")


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("the request needs a model: the name of a served function (GET /v1/models lists them)")
    return model


def _generation(body: Any, prompts: list[Any]) -> GenerationRequest:
    if body.get("n", 1) != 1:
        raise RequestError("n: one answer per request is given (n=1)")
    params = {_PARAMETERS[key]: value for key, value in body.items() if key in _PARAMETERS and value is not None}
    for key in ("max_new_tokens", "seed"):
        if key in params and (not isinstance(params[key], int) or isinstance(params[key], bool)):
            raise RequestError(f"{'max_tokens' if key == 'max_new_tokens' else key}: an integer, got {params[key]!r}")
    for key in ("temperature", "top_p"):
        if key in params and (not isinstance(params[key], int | float) or isinstance(params[key], bool)):
            raise RequestError(f"{key}: a number, got {params[key]!r}")
    # as OpenAI's, a request that gives no seed samples afresh; the seed drawn here still makes a retry on another worker exact
    params.setdefault("seed", secrets.randbits(63))
    options = body.get("stream_options") or {}
    return GenerationRequest(
        _model(body), prompts, params, stream=body.get("stream") is True,
        usage_in_stream=isinstance(options, Mapping) and options.get("include_usage") is True,
    )


def chat_request(body: Any) -> GenerationRequest:
    """A ``/v1/chat/completions`` body: its messages are one prompt, through the model's chat template."""
    _check_object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):  # content parts: the text ones, joined
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or not isinstance(content, str):
            raise RequestError(f"messages[{i}]: an object with a role and a text content")
        checked.append({"role": message["role"], "content": content})
    return _generation(body, [checked])


def completion_request(body: Any) -> GenerationRequest:
    """A ``/v1/completions`` body: its prompt (or list of prompts), each used as written."""
    _check_object(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompt: a string, or a list of strings")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"prompt: at most {MAX_PROMPTS} prompts a request, got {len(prompts)} (SQL scores a table of them)")
    ask = _generation(body, prompts)
    if ask.stream and len(prompts) > 1:
        raise RequestError("prompt: a streamed completion takes one prompt")
    return ask


def embeddings_request(body: Any) -> tuple[str, list[str], str]:
    """A ``/v1/embeddings`` body: the function, the texts to embed (``input``: a string or a list), and
    how to encode the vectors (``float``, or ``base64`` of little-endian float32s, which the client asks by default)."""
    _check_object(body)
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError("input: a string, or a list of strings (token arrays are not taken)")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise RequestError("encoding_format: float or base64")
    return _model(body), texts, encoding


def answer_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_answer(ident: str, model: str, text: str, finish_reason: str, used: dict) -> dict:
    return {
        "id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": used,
    }


def completion_answer(ident: str, model: str, answers: list[tuple[str, str]], used: dict) -> dict:
    """``answers``: each prompt's (text, finish_reason), in the prompts' order."""
    return {
        "id": ident, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None} for i, (text, reason) in enumerate(answers)],
        "usage": used,
    }


def chunk(ident: str, model: str, *, chat: bool, text: str | None = None, finish_reason: str | None = None,
          first: bool = False, used: dict | None = None) -> dict:
    """One streamed chunk: a piece of text, the end (``finish_reason``), or the usage (no choices)."""
    if used is not None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text is not None else {})
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]
    made = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}
    if used is not None:
        made["usage"] = used
    return made


def event(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


DONE = event("[DONE]")


def embeddings_answer(model: str, vectors: list[list[float]], encoding: str) -> dict:
    def encoded(vector: list[float]) -> list[float] | str:
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode() if encoding == "base64" else vector

    return {
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": encoded(vector)} for i, vector in enumerate(vectors)],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


def models_answer(names: list[str]) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "rayudf"} for name in names]}


def error_body(status: int, message: str) -> dict:
    """An error in OpenAI's shape (the client raises the exception of its status with this message)."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": _ERROR_CODES.get(status)}}
