"""The OpenAI-compatible request bodies (validated with pydantic; unknown fields are
refused rather than ignored), the response bodies, and the error shape."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "CHAT",
    "COMPLETION",
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "LoadAdapterRequest",
    "Reply",
    "UnloadAdapterRequest",
]


class APIError(Exception):
    """An error answered in OpenAI's shape:
    ``{"error": {"message", "type", "param", "code"}}``.

    Example:
        >>> raise APIError(404, "The model 'x' does not exist.", code="model_not_found")
    """

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        500: "server_error",
        503: "server_overloaded",
    }

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Generate(_Body):
    """The fields both generation endpoints take."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Generate):
    """``POST /v1/completions``; ``max_tokens`` defaults to 16, as OpenAI's."""

    prompt: str


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatRequest(_Generate):
    """``POST /v1/chat/completions``; ``max_tokens`` (or ``max_completion_tokens``)
    defaults to the rest of the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadAdapterRequest(_Body):
    """``POST /v1/load_lora_adapter``, as vLLM's."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Body):
    """``POST /v1/unload_lora_adapter``, as vLLM's."""

    lora_name: str = Field(min_length=1)


@dataclass(frozen=True)
class Reply:
    """How one endpoint writes its answers: whole, and as stream chunks."""

    object: str
    chunk_object: str
    id_prefix: str
    chat: bool

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"

    def body(self, rid: str, model: str, text: str, finish: str, usage: dict) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish)
        return self._envelope(rid, model, self.object, [choice]) | {"usage": usage}

    def chunk(self, rid: str, model: str, text: str, finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish)
        return self._envelope(rid, model, self.chunk_object, [choice])

    def first_chunk(self, rid: str, model: str) -> dict[str, Any] | None:
        """The chunk that opens a chat stream (the assistant's role); None otherwise."""
        if not self.chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}}
        choice.update(logprobs=None, finish_reason=None)
        return self._envelope(rid, model, self.chunk_object, [choice])

    def usage_chunk(self, rid: str, model: str, usage: dict) -> dict[str, Any]:
        return self._envelope(rid, model, self.chunk_object, []) | {"usage": usage}

    @staticmethod
    def _envelope(rid: str, model: str, obj: str, choices: list) -> dict[str, Any]:
        return {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "choices": choices,
        }


COMPLETION = Reply("text_completion", "text_completion", "cmpl", chat=False)
CHAT = Reply("chat.completion", "chat.completion.chunk", "chatcmpl", chat=True)
