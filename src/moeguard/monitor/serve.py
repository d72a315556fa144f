"""``moeguard serve``: a minimal OpenAI-compatible completions endpoint with the routing monitor
attached, and ``/metrics``. It is also the example of wiring :class:`RoutingMonitor` into your own
server: enter the monitor once, wrap each request's generation in ``monitor.request(client)``.

- ``POST /v1/completions`` ``{"prompt": str, "max_tokens": int, "user": str}``: greedy
  completion. Whose window a request joins is ``client_id``'s choice (:func:`client_source`): by
  default the connection's address (an IPv6 one by its /56, what one subscriber is given), which a
  client cannot pick per request as it can the body's ``user``; behind an authenticating gateway,
  ``header:NAME`` (the identity the gateway set) or ``user`` (when the gateway sets it).
- ``GET /metrics``: Prometheus exposition (per-expert load, alerts, per-client anomaly).
- ``GET /health``.

Bad requests get 4xx: malformed JSON or wrong types 422, a body over ``max_body_bytes`` (declared
or chunked) or a prompt over ``max_prompt_chars`` 413, and a prompt whose tokens and ``max_tokens`` need
more than the model's positions 413 (the offline scorer would route it in chunks, the served forward in
one). Requests are serialized through one lock (one model). Nothing of a prompt is logged or kept
(it is tokenized without moeguard's memoizing ``encode``); the monitor's scores stay on the server
(an attacker who saw them could tune against them): with ``metrics_token`` set, ``/metrics``
answers only ``Authorization: Bearer <token>``.
"""


# no ``from __future__ import annotations``: FastAPI reads the request model from the endpoint's
# annotation at run time, and the model is defined inside create_app
import hmac
import ipaddress
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.models.families import text_config
from moeguard.monitor.online import RoutingMonitor

MAX_TOKENS = 64
MAX_CLIENT_CHARS = 128
V6_PREFIX = 56          # a subscriber is delegated a /56 (RFC 6177) or more
CLIENT_SOURCES = "'address' (or 'address/N': IPv6 clients by their /N), 'user' or 'header:NAME'"
DRAIN_BYTES = 1 << 20   # what BodyLimit reads past the limit before closing (a reset hides the 413)
BODY_SECONDS = 30.0     # the most a request body may take to arrive (a trickled one held its buffer forever)
# connections served at once beyond --max-waiting: /health, /metrics and requests being refused
SPARE_CONNECTIONS = 32
HEADER_SECONDS = 10.0   # the most a request's headers may take to arrive (an idle socket held a slot forever)


@dataclass(frozen=True)
class ClientSource:
    """Whose window a request joins (``client_id``; module docstring)."""

    kind: str                   # "address", "user" or "header"
    header: str | None = None   # lower-case header name (kind "header")
    v6_prefix: int = V6_PREFIX  # an IPv6 client's network (kind "address")


def client_source(spec: str) -> ClientSource:
    """``client_id`` parsed (``address``, ``address/N``, ``user``, ``header:NAME``), or a one-line error."""
    s = spec.strip()
    low = s.lower()
    if low in ("address", "user"):
        return ClientSource(low)
    m = re.fullmatch(r"address/([0-9]{1,3})", low)
    if m and 32 <= int(m.group(1)) <= 128:
        return ClientSource("address", v6_prefix=int(m.group(1)))
    kind, sep, header = s.partition(":")
    # a header name is an HTTP token: ASCII only (the server encodes names as latin-1)
    if kind.strip().lower() == "header" and header.strip() and all(c.isascii() and (c.isalnum() or c in "-_")
                                                                    for c in header.strip()):
        return ClientSource("header", header=header.strip().lower())
    raise MoeguardError(f"--client-id is '{spec}'; expected {CLIENT_SOURCES}",
                        hint="pass --client-id address (the default), or header:X-User-Id behind a gateway that sets it")


def _address(host: str | None, v6_prefix: int = V6_PREFIX) -> str:
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:       # a unix socket or a test client's name
        return host[:MAX_CLIENT_CHARS]
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        return str(mapped)
    if ip.version == 6 and not ip.is_link_local:
        # one address, or one /64, of a subscriber's prefix per request would never fill a window;
        # link-local ones stay whole (with their zone): they all share fe80::/64
        return str(ipaddress.ip_network(f"{ip}/{v6_prefix}", strict=False))
    return str(ip)


def uvicorn_config(app, *, host: str, port: int, log_level: str = "warning", limit_concurrency: int | None = None):
    """How ``moeguard serve`` runs the app: the connection's own address, never one a request
    claims. uvicorn trusts ``X-Forwarded-For`` from loopback peers by default, and with a
    server on 127.0.0.1 every client is one: a new claimed address per request would never fill
    a window. Behind a proxy, key clients with ``header:NAME`` instead. ``limit_concurrency``: the
    most connections served at once (uvicorn answers 503 beyond it): every one holds a body of up to
    the app's limit before the app's own count of waiting completions sees it."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, proxy_headers=False,
                          server_header=False, limit_concurrency=limit_concurrency, http=header_deadline_protocol())


_PROTOCOL: list = []


def header_deadline_protocol(seconds: float | None = None):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived within
    ``seconds`` of it opening (or of its last response). uvicorn counts a connection against
    ``limit_concurrency`` from its first byte, and times one out only after a response: a few hundred
    sockets that never sent a request made /health, /metrics and every completion answer 503, for as
    long as they stayed open. A body is BodyLimit's to time."""
    seconds = HEADER_SECONDS if seconds is None else seconds
    if _PROTOCOL and _PROTOCOL[0].header_seconds == seconds:
        return _PROTOCOL[0]
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        header_seconds = seconds
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(self.header_seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _waiting(self) -> bool:   # no request between its headers and its response
            return self.cycle is None or self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            if self._waiting():        # bytes of a next request: its headers are on the clock
                self._arm()
            super().data_received(data)
            if self.cycle is not before:   # its headers arrived: the app (and BodyLimit) has it now
                self._disarm()

        def _expire(self) -> None:
            self._deadline = None
            if self._waiting() and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    _PROTOCOL[:] = [HeaderDeadline]
    return HeaderDeadline


def create_app(model, tokenizer, monitor: RoutingMonitor, *, name: str = "moeguard", max_prompt_chars: int = 8000,
               max_body_bytes: int = 64_000, metrics_token: str | None = None, client_id: str = "address",
               max_waiting: int = 256):
    """The ASGI app: the FastAPI app wrapped in :class:`BodyLimit` (the FastAPI app itself, to add
    routes or middleware, is ``.app``). ``max_waiting``: completions at the model or waiting for it
    (each holds its parsed body); more get 503 with Retry-After, so a flood is bounded in memory. Each request's monitor result goes to the monitor's
    ``on_result`` (server side: alerts to a log, a SIEM, ...) when its batch is scored, never into
    the response."""
    import asyncio

    import torch
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
    from transformers import GenerationConfig

    from moeguard.tasks.tokens import bos_ids, eos_ids, greedy_generate, model_device, pad_id

    source = client_source(client_id)
    positions = int(getattr(text_config(model.config), "max_position_embeddings", 0) or 0) or None
    # a profile of replies scores the first N greedy tokens of each: a client's shorter max_tokens is cut
    # from a reply of N (greedy: the same text), or its reply statistics were a shorter reply's, against a
    # null of N-token ones (and unlike `monitor score` of the same prompt)
    profiled = monitor.profile.replies.max_tokens if monitor.profile.replies is not None else 0
    from moeguard.monitor.fit import embedding_rows, past_embeddings

    vocab = embedding_rows(model)
    ends = set(eos_ids(model, tokenizer))   # every id that ends a turn: not part of the reply
    device = model_device(model)   # a prompt goes where the model's embeddings are (GPU or CPU)

    class Completion(BaseModel):
        model_config = ConfigDict(extra="ignore")   # temperature, top_p, stop...: greedy decoding, said in the docs
        prompt: StrictStr
        max_tokens: StrictInt = Field(16, ge=1, le=MAX_TOKENS)
        user: StrictStr = Field("anonymous", min_length=1, max_length=128)
        # what would change the answer's shape, not only its tokens: refused (400), not answered as if absent
        # (an SDK asking for a stream got one JSON body and failed to parse it)
        stream: Any = None
        n: Any = None
        best_of: Any = None
        echo: Any = None
        logprobs: Any = None
        suffix: Any = None

    def unsupported(body: Completion) -> str | None:
        asked = [f for f, v, default in (("stream", body.stream, False), ("n", body.n, 1), ("best_of", body.best_of, 1),
                                         ("echo", body.echo, False), ("logprobs", body.logprobs, None),
                                         ("suffix", body.suffix, None))
                 if v is not None and not (v == default and type(v) is type(default))]
        return (f"{', '.join(asked)} {'is' if len(asked) == 1 else 'are'} not supported: this endpoint answers one whole, "
                "greedy completion per request (drop them, or send them at their defaults)") if asked else None

    app = FastAPI(title=f"{name} (moeguard serve)", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 echoes the offending input, and rendering an inf or a lone surrogate
        # from it failed (a 500): say where and what, never the value
        def clean(x: Any) -> str:
            return str(x).encode("utf-8", "replace").decode("utf-8")[:200]
        details = [{"loc": [clean(part) for part in e.get("loc", ())], "msg": clean(e.get("msg", ""))} for e in exc.errors()]
        return JSONResponse({"error": {"message": "invalid request body", "details": details}}, status_code=422)

    def client_of(request: Request, body: Completion) -> str | None:
        if source.kind == "address":
            return _address(request.client.host if request.client else None, source.v6_prefix)
        if source.kind == "user":
            return body.user
        values = request.headers.getlist(source.header)
        if len(values) != 1:   # a gateway that appends instead of replacing would let the client's own copy win
            return None
        value = values[0].strip()
        # a comma: the same appending gateway, joining the values on one line (RFC 9110 allows it)
        return value if value and len(value) <= MAX_CLIENT_CHARS and value.isprintable() and "," not in value else None

    # Queued requests wait for the model here, on the event loop, not in a worker thread each: with a
    # thread per waiting request, 40 of them (the thread pool's size) left /metrics and /health hanging
    gate = asyncio.Lock()
    waiting = [0]   # completions at the model or waiting for it (max_waiting)

    @app.post("/v1/completions")
    async def completions(body: Completion, request: Request) -> Any:
        for field, text in (("prompt", body.prompt), ("user", body.user)):
            try:                   # JSON can carry a lone surrogate (\ud800), which no tokenizer or label takes
                text.encode("utf-8")
            except UnicodeEncodeError:
                return JSONResponse({"error": {"message": f"{field} is not valid Unicode (a lone surrogate)"}}, status_code=400)
        if (said := unsupported(body)) is not None:
            return JSONResponse({"error": {"message": said}}, status_code=400)
        client = client_of(request, body)
        if client is None:
            return JSONResponse({"error": {"message": f"header {source.header} names the client (once, 1 to {MAX_CLIENT_CHARS} "
                                                      f"printable characters, no comma); this request has none usable"}}, status_code=400)
        if len(body.prompt) > max_prompt_chars:
            return JSONResponse({"error": {"message": f"prompt over {max_prompt_chars} characters"}}, status_code=413)
        if not body.prompt.strip():   # as `monitor score` refuses it in a log (a BOS alone would join the window)
            return JSONResponse({"error": {"message": "empty prompt"}}, status_code=400)
        if waiting[0] >= max_waiting:   # the event loop's own count: no lock needed
            return JSONResponse({"error": {"message": f"{max_waiting} requests are already at the model or waiting for "
                                                      "it: retry later"}}, status_code=503, headers={"Retry-After": "1"})
        waiting[0] += 1
        try:
            async with gate:
                return await run_in_threadpool(complete, body.prompt, body.max_tokens, client)
        finally:
            waiting[0] -= 1

    def complete(prompt: str, max_tokens: int, client: str) -> Any:
        # not tasks.tokens.encode: it memoizes, and a server would keep every prompt it was sent
        ids = bos_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            return JSONResponse({"error": {"message": "empty prompt"}}, status_code=400)
        if said := past_embeddings(ids, vocab):
            # a tokenizer whose added tokens lie past the model's embeddings (a checkpoint not resized): on a
            # GPU an index past them is a device-side assert, and every later request fails with it
            return JSONResponse({"error": {"message": f"the prompt {said}"}}, status_code=400)
        # the prompt and every generated token but the last are fed to the model
        if positions is not None and len(ids) + max_tokens - 1 > positions:
            return JSONResponse({"error": {"message": f"the prompt's {len(ids)} tokens and max_tokens {max_tokens} need "
                                                      f"{len(ids) + max_tokens - 1} positions; the model has {positions}: "
                                                      f"shorten the prompt or lower max_tokens"}}, status_code=413)
        with lock, torch.no_grad():
            with monitor.request(client) as r:
                # greedy, as the profile's replies were made (monitor/hijack.reply): none of the checkpoint's
                # own decoding settings (a repetition penalty, banned tokens), which generate() applies even
                # without sampling and which would score served replies against another decoding's null
                # as many as the profile scores where the positions allow (a prompt near them: a shorter reply)
                steps = max(max_tokens, min(profiled, positions - len(ids) + 1 if positions else profiled))
                config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=steps,
                                          pad_token_id=pad_id(tokenizer), eos_token_id=sorted(ends) or None)
                out = greedy_generate(model, config, input_ids=torch.tensor([ids], device=device),
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device))
                made = out[0, len(ids):].tolist()
                # the reply's length up to its end of text: the positions a profile of replies scores
                r.reply_tokens = next((i for i, t in enumerate(made) if t in ends), len(made))
                new = made[:max_tokens]   # what the client asked for
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "text": tokenizer.decode(new, skip_special_tokens=True),
                                            # any id that ends a turn (a chat model's <|im_end|>), not only the EOS
                                            "finish_reason": "stop" if any(t in ends for t in new) else "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)}}

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if metrics_token is not None and not (scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("latin-1", "replace"), metrics_token.encode())):
            return JSONResponse({"error": {"message": "metrics need 'Authorization: Bearer <token>'"}}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(monitor.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict:   # on the event loop: a probe never waits for a worker thread
        return {"status": "ok"}

    return BodyLimit(app, max_bytes=max_body_bytes)


class BodyLimit:
    """ASGI wrapper: an HTTP body over ``max_bytes`` is answered 413 before the app sees it, whether
    its Content-Length says so or it arrives chunked (a header check alone lets a chunked body of
    any size through). The body is read here, at most ``max_bytes`` of it, and replayed to the app."""

    def __init__(self, app, *, max_bytes: int, body_seconds: float = BODY_SECONDS):
        self.app, self.max_bytes, self.body_seconds = app, max_bytes, body_seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import asyncio

        deadline = asyncio.get_running_loop().time() + self.body_seconds

        async def body():   # the whole body within body_seconds: a trickled one held its buffer forever
            left = deadline - asyncio.get_running_loop().time()
            try:
                if left <= 0:
                    raise TimeoutError
                return await asyncio.wait_for(receive(), timeout=left)
            except TimeoutError:
                raise _BodyTimeout from None
        try:
            # the app gets the server's own receive: it may wait on it (a disconnect) while the model runs
            return await self._limited(scope, body, receive, send)
        except _BodyTimeout:
            text = json.dumps({"error": {"message": f"request body not received within {self.body_seconds:g} s"}}).encode()
            await send({"type": "http.response.start", "status": 408,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(text)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": text})

    async def _limited(self, scope, receive, rest, send):
        size = dict(scope.get("headers") or []).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_bytes):
            if size.isdigit() and int(size) <= self.max_bytes + DRAIN_BYTES:   # read it first (a reset hides the 413)
                more = True
                while more:
                    message = await receive()
                    more = message["type"] == "http.request" and message.get("more_body", False)
            return await self._refuse(send)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":     # the client went away: let the app see it
                return await self.app(scope, _replay([message], rest), send)
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            more = message.get("more_body", False)
            if total > self.max_bytes:
                # read (and drop) a little more of what is still coming, before answering (uvicorn
                # ends the request's input once the response is sent): closing with unread data makes
                # the TCP stack reset the connection, and the client sees that, not the 413
                chunks, drained = [], 0
                while more and drained < DRAIN_BYTES:
                    message = await receive()
                    more = message["type"] == "http.request" and message.get("more_body", False)
                    drained += len(message.get("body", b""))
                return await self._refuse(send)
        return await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                             rest), send)

    async def _refuse(self, send):
        body = json.dumps({"error": {"message": f"request body over {self.max_bytes} bytes"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _BodyTimeout(Exception):
    """A request body that did not arrive within BodyLimit's time (answered 408)."""


def _replay(messages: list, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed
