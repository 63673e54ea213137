"""The HTTP face of the server (FastAPI): OpenAI's completions, chat completions and
models endpoints, vLLM's runtime adapter endpoints, ``/health`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from metapeft.lm.model import load_model
from metapeft.nn.fast import use_fast_layers
from metapeft.serve.bank import Adapter, AdapterBank
from metapeft.serve.engine import Delta, Engine, Failed, Finished, Generation, Overloaded
from metapeft.serve.metrics import ServerMetrics
from metapeft.serve.protocol import (
    CHAT,
    COMPLETION,
    APIError,
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    Reply,
    UnloadAdapterRequest,
)
from metapeft.serve.sampling import Sampling

__all__ = ["Server", "ServerOptions", "create_app"]

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    """What ``metapeft serve`` was asked for (see :func:`metapeft.serve.cli.main`)."""

    model: str
    served_model_name: str | None = None
    lora_modules: dict[str, str] = field(default_factory=dict)
    max_batch_size: int = 8
    max_loras: int = 8
    max_lora_rank: int = 16
    max_queue: int = 64
    max_model_len: int | None = None
    api_key: str | None = None
    allow_runtime_lora: bool = False
    lora_root: str | None = None


class Server:
    """A loaded model with its adapters, engine and metrics.

    Example:
        >>> server = Server.load(ServerOptions("tiny-llama", lora_modules={"a": "adapters/a"}))
        >>> app = create_app(server)
    """

    def __init__(
        self,
        options: ServerOptions,
        tokenizer: Any,
        bank: AdapterBank,
        engine: Engine,
        metrics: ServerMetrics,
        max_model_len: int,
    ) -> None:
        self.options = options
        self.name = options.served_model_name or options.model
        self.tokenizer = tokenizer
        self.bank = bank
        self.engine = engine
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.lora_root = Path(options.lora_root).resolve() if options.lora_root else None
        self.created = int(time.time())

    @classmethod
    def load(cls, options: ServerOptions) -> Server:
        """Loads the model (an mlx-lm folder or a ``.gguf``) and the adapters named.

        Raises:
            FileNotFoundError, ValueError: Naming the model, the adapter or the option
                at fault.
        """
        if options.lora_root and not Path(options.lora_root).is_dir():
            raise ValueError(f"--lora-root {options.lora_root}: not a folder")
        model, tokenizer, config = load_model(options.model)
        use_fast_layers(model)
        max_model_len = options.max_model_len or config.get("max_position_embeddings")
        if not max_model_len:
            raise ValueError(
                f"{options.model}: the config gives no max_position_embeddings; "
                "set the context length with --max-model-len"
            )
        bank = AdapterBank(model, options.max_loras, options.max_lora_rank)
        name = options.served_model_name or options.model
        for adapter, path in options.lora_modules.items():
            if adapter == name:
                raise ValueError(f"--lora-modules {adapter}: that is the base model's name")
            try:
                bank.load(adapter, path)
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"--lora-modules {adapter}={path}: {e}") from None
        metrics = ServerMetrics()
        metrics.adapters_loaded.set(len(options.lora_modules))
        engine = Engine(model, tokenizer, bank, metrics, options.max_batch_size, options.max_queue)
        return cls(options, tokenizer, bank, engine, metrics, int(max_model_len))

    # ----------------------------------------------------------------- requests

    def check_model(self, name: str) -> None:
        """Raises a 404 unless ``name`` is the base model or a loaded adapter."""
        if name != self.name and name not in self.bank:
            raise self._not_found(name)

    def _not_found(self, name: str) -> APIError:
        known = [self.name] + [a.name for a in self.bank.adapters()]
        return APIError(
            404,
            f"The model {name!r} does not exist; this server has {known}.",
            param="model",
            code="model_not_found",
        )

    def acquire(self, name: str) -> Adapter | None:
        """The adapter for a request to model ``name`` (None for the base), held."""
        if name == self.name:
            return None
        try:
            return self.bank.acquire(name)
        except KeyError:  # unloaded since it was checked
            raise self._not_found(name) from None

    def prompt_tokens(self, body: CompletionRequest | ChatRequest) -> list[int]:
        tok = self.tokenizer
        if isinstance(body, CompletionRequest):
            bos = tok.bos_token
            special = bos is None or not body.prompt.startswith(bos)  # as mlx_lm.generate
            tokens = tok.encode(body.prompt, add_special_tokens=special)
            param = "prompt"
        else:
            if not tok.has_chat_template:
                raise APIError(
                    400,
                    f"The model {self.name!r} has no chat template; use /v1/completions.",
                    param="messages",
                )
            messages = [m.as_template_input() for m in body.messages]
            try:
                tokens = tok.apply_chat_template(messages, add_generation_prompt=True)
            except Exception as e:  # the template's own checks (jinja raises its own types)
                raise APIError(400, f"messages: {e}", param="messages") from None
            param = "messages"
        if not tokens:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        if len(tokens) >= self.max_model_len:
            raise APIError(
                400,
                f"{param}: the prompt has {len(tokens)} tokens, but the context holds "
                f"{self.max_model_len} (--max-model-len) including the generated tokens",
                param=param,
            )
        return tokens

    def max_tokens(self, body: CompletionRequest | ChatRequest, prompt: int) -> int:
        room = self.max_model_len - prompt
        requested, param = body.max_tokens, "max_tokens"
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            if requested is not None:
                raise APIError(
                    400,
                    "give max_tokens or max_completion_tokens, not both",
                    param="max_completion_tokens",
                )
            requested, param = body.max_completion_tokens, "max_completion_tokens"
        if requested is None:
            return min(16, room) if isinstance(body, CompletionRequest) else room
        if requested > room:
            raise APIError(
                400,
                f"{param}={requested} plus the prompt's {prompt} tokens is more than the "
                f"model's context of {self.max_model_len} tokens",
                param=param,
            )
        return requested

    def submit(self, body: CompletionRequest | ChatRequest) -> Generation:
        """Checks ``body`` and queues its generation."""
        self.check_model(body.model)
        prompt = self.prompt_tokens(body)
        sampling = Sampling(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=secrets.randbits(63) if body.seed is None else body.seed,
        )
        max_tokens = self.max_tokens(body, len(prompt))
        adapter = self.acquire(body.model)
        gen = Generation(prompt, max_tokens, sampling, body.stops(), adapter)
        try:
            self.engine.submit(gen)
        except Overloaded as e:
            self._release(adapter)
            raise APIError(
                503,
                f"The server is overloaded ({e}); retry later.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            ) from None
        except RuntimeError as e:
            self._release(adapter)
            raise APIError(503, f"{e}.", code="engine_stopped") from None
        return gen

    def _release(self, adapter: Adapter | None) -> None:
        if adapter is not None:
            self.bank.release(adapter)

    # ----------------------------------------------------------------- adapters

    def check_runtime_lora(self, path: str | None = None) -> Path | None:
        """Raises a 403 unless runtime adapter loading is on and ``path`` is under
        ``--lora-root`` (when set); returns the resolved path."""
        if not self.options.allow_runtime_lora:
            raise APIError(
                403,
                "Loading and unloading adapters at runtime is off; start the server with "
                "--allow-runtime-lora.",
                code="runtime_lora_disabled",
            )
        if path is None:
            return None
        resolved = Path(path).expanduser().resolve()
        if self.lora_root is not None and not resolved.is_relative_to(self.lora_root):
            raise APIError(
                403,
                f"lora_path {path!r} is outside the folder adapters load from "
                f"(--lora-root {self.lora_root}).",
                param="lora_path",
                code="outside_lora_root",
            )
        return resolved


def create_app(server: Server) -> FastAPI:
    """The FastAPI application serving ``server``; its lifespan runs the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="metapeft", lifespan=lifespan)
    metrics = server.metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.rejected.labels(code=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(exc.status_code, str(exc.detail)))

    async def authorize(request: Request) -> None:
        key = server.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(
                401,
                "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health() -> dict[str, str]:
        if not server.engine.alive:
            raise APIError(503, "The generation engine is not running.", code="engine_stopped")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": server.created,
                "owned_by": "metapeft",
                "root": root,
                "parent": parent,
            }

        data = [card(server.name, server.options.model, None)]
        data += [card(a.name, str(a.path), server.name) for a in server.bank.adapters()]
        return {"object": "list", "data": data}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _generate(server, body, request, COMPLETION)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await _generate(server, body, request, CHAT)

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest) -> PlainTextResponse:
        path = server.check_runtime_lora(body.lora_path)
        name = body.lora_name
        if name == server.name or name in server.bank:
            raise APIError(400, f"The adapter {name!r} has already been loaded.", param="lora_name")
        try:
            await asyncio.wrap_future(server.engine.call(lambda: server.bank.load(name, path)))
        except (FileNotFoundError, ValueError) as e:
            raise APIError(400, str(e), param="lora_path") from None
        metrics.adapters_loaded.set(len(server.bank.adapters()))
        log.info("loaded adapter %r from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest) -> PlainTextResponse:
        server.check_runtime_lora()
        try:
            server.bank.unload(body.lora_name)
        except KeyError:
            raise APIError(
                404,
                f"No adapter named {body.lora_name!r} is loaded.",
                param="lora_name",
                code="model_not_found",
            ) from None
        metrics.adapters_loaded.set(len(server.bank.adapters()))
        log.info("unloaded adapter %r", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    app.include_router(v1)
    return app


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a request body, as a 400 naming the field."""
    error = exc.errors()[0]
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", error["msg"])
        return APIError(400, f"The request body is not valid JSON: {reason}")
    if not loc:
        return APIError(400, f"The request body: {error['msg']}")
    param = loc[0]
    where = ".".join(loc)
    if error["type"] == "extra_forbidden":
        return APIError(400, f"Unsupported field {where!r}.", param=param)
    return APIError(400, f"{where}: {error['msg']}", param=param)


async def _generate(
    server: Server, body: CompletionRequest | ChatRequest, request: Request, reply: Reply
) -> Response:
    gen = server.submit(body)
    rid = reply.new_id()
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(server, gen, reply, rid, body.model, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    collect = asyncio.ensure_future(_collect(gen))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
            server.engine.cancel(gen)
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # the client has gone: nobody reads this
    text, end = collect.result()
    if isinstance(end, Failed):
        error = APIError(500, end.message, code="generation_failed")
        return JSONResponse(error.body(), status_code=500)
    usage = _usage(end.prompt_tokens, end.completion_tokens)
    return JSONResponse(reply.body(rid, body.model, text, end.reason, usage))


async def _collect(gen: Generation) -> tuple[str, Finished | Failed]:
    """The request's text and how it ended."""
    parts = []
    async for event in gen.events():
        if isinstance(event, Delta):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise RuntimeError("the request's events ended without an end")


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(
    server: Server, gen: Generation, reply: Reply, rid: str, model: str, usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: the chunks, then ``[DONE]``; the generation is cancelled if
    the client goes away first."""
    try:
        first = reply.first_chunk(rid, model)
        if first is not None:
            yield _sse(first)
        async for event in gen.events():
            if isinstance(event, Delta):
                yield _sse(reply.chunk(rid, model, event.text))
            elif isinstance(event, Failed):
                yield _sse(APIError(500, event.message, code="generation_failed").body())
            else:
                yield _sse(reply.chunk(rid, model, "", event.reason))
                if usage:
                    counts = _usage(event.prompt_tokens, event.completion_tokens)
                    yield _sse(reply.usage_chunk(rid, model, counts))
        yield "data: [DONE]\n\n"
    finally:
        server.engine.cancel(gen)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
