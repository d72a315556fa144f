"""serve's memory bound under slow or many connections (2026-12-07 review): a request body must
arrive within BODY_SECONDS (a trickled one held its buffer forever), and uvicorn serves at most
--max-waiting plus a margin of connections at once (each held a body before the app counted it)."""

import asyncio

from moeguard.monitor.serve import SPARE_CONNECTIONS, BodyLimit, uvicorn_config


def _run(app, messages, *, slow_after: int):
    """Send ``app`` one request whose body's messages after the first ``slow_after`` never come."""
    sent = []

    async def go():
        queue = list(messages)

        async def receive():
            if len(messages) - len(queue) >= slow_after:
                await asyncio.sleep(3600)
            return queue.pop(0)

        async def send(message):
            sent.append(message)
        await app({"type": "http", "headers": [(b"content-type", b"application/json")]}, receive, send)
    asyncio.run(go())
    return sent


def test_a_body_that_does_not_arrive_in_time_is_answered_408_and_the_app_never_sees_it():
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
    limited = BodyLimit(app, max_bytes=1000, body_seconds=0.05)
    parts = [{"type": "http.request", "body": b'{"prompt": ', "more_body": True},
             {"type": "http.request", "body": b'"x"}', "more_body": False}]
    sent = _run(limited, parts, slow_after=1)
    assert seen == [] and sent[0]["status"] == 408 and b"not received within 0.05 s" in sent[1]["body"]
    # in time: the app gets the whole body, and the server's own receive afterwards: a model that takes
    # longer than the body's time may still wait on it (for a disconnect)

    async def slow_app(scope, receive, send):
        seen.append(await receive())
        await asyncio.sleep(0.1)            # past the body's deadline
        seen.append(await receive())
    sent = _run(BodyLimit(slow_app, max_bytes=1000, body_seconds=0.05), [*parts, {"type": "http.disconnect"}],
                slow_after=3)
    assert seen == [{"type": "http.request", "body": b'{"prompt": "x"}', "more_body": False},
                    {"type": "http.disconnect"}] and sent == []


def test_uvicorn_serves_max_waiting_and_a_margin_of_connections():
    config = uvicorn_config(object(), host="127.0.0.1", port=1, limit_concurrency=256 + SPARE_CONNECTIONS)
    assert config.limit_concurrency == 288
    assert uvicorn_config(object(), host="127.0.0.1", port=1).limit_concurrency is None


def test_sockets_that_never_send_their_headers_are_closed_and_health_answers(monkeypatch):
    """uvicorn counts a connection against limit_concurrency from its opening and times it out only after
    a response: idle sockets (or headers trickled forever) made /health, /metrics and every completion
    answer 503 for as long as they stayed open."""
    import http.client
    import socket
    import time

    import moeguard.monitor.serve as serve

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    monkeypatch.setattr(serve, "HEADER_SECONDS", 0.5)
    from test_serve import _serving

    with _serving(app, limit_concurrency=5) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        idle[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")   # headers begun, never ended
        # a request answered, then a next one begun on the same connection and never ended
        kept = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"\r\n\r\nok"):   # the whole response, its body included
            got = kept.recv(1024)
            assert got, first
            first += got
        assert first.startswith(b"HTTP/1.1 200"), first
        kept.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.3)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/health")
        assert c.getresponse().status == 503   # the limit is reached while they stay open (uvicorn's answer)
        c.close()
        for sock in [*idle, kept]:   # each closed by the server once its headers are late
            sock.settimeout(5)
            assert sock.recv(1024) == b""
            sock.close()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/health")
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"ok")
        c.close()
