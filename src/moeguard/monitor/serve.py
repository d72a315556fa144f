"""``moeguard serve``: a minimal OpenAI-compatible completions endpoint with the routing monitor
attached, and ``/metrics``. It is also the example of wiring :class:`RoutingMonitor` into your own
server: enter the monitor once, wrap each request's generation in ``monitor.request(client)``.

- ``POST /v1/completions`` ``{"prompt": str, "max_tokens": int, "user": str}``: greedy
  completion. ``user`` names the client whose windows are scored (default ``anonymous``).
- ``GET /metrics``: Prometheus exposition (per-expert load, alerts, per-client anomaly).
- ``GET /health``.

Bad requests get 4xx: malformed JSON or wrong types 422, a body over ``max_body_bytes`` or a
prompt over ``max_prompt_chars`` 413. Requests are serialized through one lock (one model).
Nothing of a prompt is logged; the monitor's scores stay on the server (an attacker who saw them
could tune against them).
"""


# no ``from __future__ import annotations``: FastAPI reads the request model from the endpoint's
# annotation at run time, and the model is defined inside create_app
import threading
import time
import uuid
from typing import Any

from moeguard.monitor.online import RoutingMonitor

MAX_TOKENS = 64


def create_app(model, tokenizer, monitor: RoutingMonitor, *, name: str = "moeguard", max_prompt_chars: int = 8000,
               max_body_bytes: int = 64_000):
    """The FastAPI app. Each request's monitor result goes to the monitor's ``on_result`` (server
    side: alerts to a log, a SIEM, ...) when its batch is scored, never into the response."""
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

    from moeguard.tasks.tokens import bos_ids, encode

    class Completion(BaseModel):
        model_config = ConfigDict(extra="ignore")
        prompt: StrictStr
        max_tokens: StrictInt = Field(16, ge=1, le=MAX_TOKENS)
        user: StrictStr = Field("anonymous", min_length=1, max_length=128)

    app = FastAPI(title=f"{name} (moeguard serve)", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
            return JSONResponse({"error": {"message": f"request body over {max_body_bytes} bytes"}}, status_code=413)
        return await call_next(request)

    @app.post("/v1/completions")
    def completions(body: Completion) -> Any:
        if len(body.prompt) > max_prompt_chars:
            return JSONResponse({"error": {"message": f"prompt over {max_prompt_chars} characters"}}, status_code=413)
        ids = bos_ids(tokenizer) + encode(tokenizer, body.prompt)
        if not ids:
            return JSONResponse({"error": {"message": "empty prompt"}}, status_code=400)
        with lock, torch.no_grad():
            with monitor.request(body.user):
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=body.max_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = out[0, len(ids):].tolist()
        eos = tokenizer.eos_token_id
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "text": tokenizer.decode(new, skip_special_tokens=True),
                                            "finish_reason": "stop" if eos is not None and eos in new else "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)}}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(monitor.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app
