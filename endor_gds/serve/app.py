"""The OpenAI-compatible HTTP API over an :class:`~endor_gds.serve.engine.Engine` (FastAPI).

``POST /v1/completions`` and ``/v1/chat/completions`` (streamed as server-sent events, or not),
``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text format). Errors have
OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (bad
JSON, a prompt longer than the model's positions, ``max_tokens`` <= 0), 404 for an unknown model,
429 with ``Retry-After`` when the queue is full, 500 naming a failed step (the server goes on).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from endor_gds.serve.engine import Engine, GenerationError, QueueFullError, SamplingParams

__all__ = ["create_app", "ApiError"]


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers


def _error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields this server does not use are accepted
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class _Detokenizer:
    """Token ids to text increments: holds back a partial UTF-8 character and cuts at a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop, self.ids, self.text = tokenizer, stop, [], ""

    def add(self, ids: list[int]) -> tuple[str, bool]:
        """``(new text, a stop string was reached)``."""
        self.ids += ids
        if self.tok is None:  # no tokenizer in the file: the text is the token ids
            full = " ".join(map(str, self.ids))
        else:
            full = self.tok.decode(self.ids, skip_special_tokens=True)
            if full.endswith("\ufffd"):  # a character split over tokens: wait for the rest
                return "", False
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        cut = min((i for i in (full.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            full = full[:cut]
        new, self.text = full[len(self.text):], full
        return new, cut >= 0


def create_app(engine: Engine, tokenizer, model_name: str, runtime=None) -> FastAPI:
    """The application; ``runtime`` (the model's ``StreamingRuntime``) feeds ``/metrics``."""
    app = FastAPI(title="endor_gds", docs_url=None, redoc_url=None)
    created = int(time.time())
    recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens) for tokens/s

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(_error_body(str(exc), exc.type, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errs)
        return JSONResponse(_error_body(msg or "invalid request", "invalid_request_error", where), 400)

    def _prepare(body: _Sampling, prompt_ids: list[int], max_tokens: int | None) -> SamplingParams:
        if body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise ApiError(400, "n must be 1 (one choice per request)", param="n")
        if body.seed is not None:
            raise ApiError(400, "a per-request seed is not supported: the requests of a batch share one "
                                "sampler (set it for the server with --seed); omit seed", param="seed")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = engine.max_positions - len(prompt_ids)
        max_tokens = min(16, max(room, 1)) if max_tokens is None else max_tokens  # OpenAI's default: 16
        if max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if len(prompt_ids) + max_tokens > engine.max_positions:
            raise ApiError(400, f"this model's maximum context length is {engine.max_positions} tokens; the "
                                f"prompt has {len(prompt_ids)} and max_tokens asks for {max_tokens} more",
                           param="max_tokens", code="context_length_exceeded")
        if len(prompt_ids) + max_tokens > engine.cache_tokens:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({max_tokens}) need more "
                                f"KV cache than this server has ({engine.cache_tokens} tokens; --kv-cache sets it)",
                           param="max_tokens", code="context_length_exceeded")
        try:
            engine.check_room()
        except QueueFullError as exc:
            raise ApiError(429, f"the server is busy: {exc}", type_="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p)

    def _encode(text_or_ids) -> list[int]:
        if isinstance(text_or_ids, list):
            if any(not 0 <= t < engine.vocab_size for t in text_or_ids):
                raise ApiError(400, f"token ids must be in [0, {engine.vocab_size})", param="prompt")
            return list(text_or_ids)
        if tokenizer is None:
            raise ApiError(400, "this model's file embeds no tokenizer: give the prompt as a list of token ids",
                           param="prompt")
        return tokenizer(text_or_ids)["input_ids"]

    async def _run(prompt_ids, params, stop):
        """Yield ``(text increment, None)`` as tokens come, then ``(None, (finish_reason, tokens))``."""
        detok = _Detokenizer(tokenizer, [stop] if isinstance(stop, str) else list(stop or []))
        tokens, reason = 0, None
        async for chunk in engine.generate(prompt_ids, params):
            tokens += len(chunk.token_ids)
            recent.append((time.monotonic(), len(chunk.token_ids)))
            text, stopped = detok.add(chunk.token_ids)
            if text:
                yield text, None
            if stopped:
                reason = "stop"
                break  # leaving the loop cancels the request in the engine
            reason = chunk.finish_reason
        yield None, (reason or "length", tokens)

    def _respond(kind: str, body: _Sampling, prompt_ids: list[int], params: SamplingParams):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(text, reason, stream):
            if kind == "chat":
                key = "delta" if stream else "message"
                msg = {"role": "assistant", "content": text} if text is not None else {}
                return {"index": 0, key: msg, "finish_reason": reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        usage = lambda n: {"prompt_tokens": len(prompt_ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(prompt_ids) + n}
        if body.stream:
            async def events():
                head = {"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": int(time.time()),
                        "model": model_name}
                try:
                    async for text, end in _run(prompt_ids, params, body.stop):
                        if end is None:
                            yield f"data: {json.dumps({**head, 'choices': [choice(text, None, True)]})}\n\n"
                        else:
                            last = {**head, "choices": [choice(None if kind == 'chat' else '', end[0], True)],
                                    "usage": usage(end[1])}
                            yield f"data: {json.dumps(last)}\n\n"
                except (GenerationError, QueueFullError) as exc:  # the status is sent: the error goes in the stream
                    kind_ = "rate_limit_exceeded" if isinstance(exc, QueueFullError) else "server_error"
                    yield f"data: {json.dumps(_error_body(f'generation failed: {exc}', kind_))}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def whole():
            parts, end = [], None
            try:
                async for text, fin in _run(prompt_ids, params, body.stop):
                    if fin is None:
                        parts.append(text)
                    else:
                        end = fin
            except GenerationError as exc:
                raise ApiError(500, f"generation failed: {exc}", type_="server_error") from None
            except QueueFullError as exc:  # filled up between the check and the start
                raise ApiError(429, f"the server is busy: {exc}", type_="rate_limit_exceeded",
                               headers={"Retry-After": "1"}) from None
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                    "choices": [choice("".join(parts), end[0], False)], "usage": usage(end[1])}

        return whole()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        ids = _encode(body.prompt)
        result = _respond("text", body, ids, _prepare(body, ids, body.max_tokens))
        return result if isinstance(result, StreamingResponse) else await result

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
        ids = tokenizer.apply_chat_template([m.model_dump() for m in body.messages], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        result = _respond("chat", body, ids, _prepare(body, ids, max_tokens))
        return result if isinstance(result, StreamingResponse) else await result

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "endor_gds"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def metrics():
        m = engine.metrics()
        now = time.monotonic()
        window = [n for t, n in recent if now - t <= 10.0]
        lines = []

        def metric(name, kind, help_, value, labels=""):
            lines.extend([f"# HELP endor_{name} {help_}", f"# TYPE endor_{name} {kind}",
                          f"endor_{name}{labels} {value}"])

        metric("requests_total", "counter", "requests admitted", m["requests"])
        metric("requests_failed_total", "counter", "requests ended by a failed step", m["failed"])
        metric("requests_rejected_total", "counter", "requests answered 429 (queue full)", m["rejected"])
        metric("tokens_generated_total", "counter", "tokens generated", m["tokens"])
        metric("tokens_per_second", "gauge", "tokens generated per second over the last 10 s", sum(window) / 10.0)
        metric("batch_size", "gauge", "requests in the batch (each step serves them all)", m["active"])
        metric("queue_length", "gauge", "requests waiting for a slot in the batch", m["waiting"])
        metric("batching_restarts_total", "counter", "batching loops started again after a failed step", m["restarts"])
        if runtime is not None:
            s = runtime.summary()
            metric("forward_steps_total", "counter", "forward steps (one weight pass each)", s["steps"])
            metric("bytes_per_step", "gauge", "bytes read per step (streamed layers)", s["per_token"]["bytes_read"])
            labels = (f'{{model="{model_name}",reader_mode="{s["reader_mode"]}",device="{s["device"]}",'
                      f'tier="{s["tier"]}"}}')
            metric("info", "gauge", "the model and how it is read", 1, labels)
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app
