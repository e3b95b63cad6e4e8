"""Request and response bodies of the HTTP API (OpenAI-compatible + sessions + usage)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CONTENT_CHARS = 100_000


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# --- OpenAI chat completions ----------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_CONTENT_CHARS)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] = Field(max_length=MAX_CONTENT_CHARS)
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI parameters (tools, logprobs, ...) are ignored rather than refused, so
    # existing clients keep working.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user: str | None = Field(default=None, max_length=256)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv2"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- sessions -------------------------------------------------------------------------------


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=200)
    system_prompt: str | None = Field(default=None, max_length=MAX_CONTENT_CHARS)


class SessionOut(BaseModel):
    id: str
    title: str
    created_at: int
    updated_at: int


class MessageOut(BaseModel):
    id: str
    role: str
    content: str
    created_at: int


class SessionDetail(SessionOut):
    messages: list[MessageOut]


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionOut]
    has_more: bool = False
    next_cursor: str | None = None  # pass as ?after= for the next page


class TurnRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1, max_length=MAX_CONTENT_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)


# --- usage ----------------------------------------------------------------------------------


class QuotaOut(BaseModel):
    limit: int | None  # None = unlimited
    remaining: int | None
    reset_at: int  # unix seconds


class UsageOut(BaseModel):
    user_id: str
    tier: str
    requests_per_minute: QuotaOut
    requests_per_day: QuotaOut
    tokens_per_day: QuotaOut
    concurrent_streams: QuotaOut
