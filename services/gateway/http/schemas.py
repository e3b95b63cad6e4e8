"""Request and response bodies of the HTTP API (OpenAI-compatible + sessions + usage)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.gateway.core.errors import InvalidInput


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# --- OpenAI chat completions ----------------------------------------------------------------
# Strict types: "max_tokens": "10" or "stream": "yes" is a 400, not silently coerced. Sizes
# (message count, bytes per message and in all, stop strings) are checked by validation.py,
# the same for HTTP and gRPC, with limits from Settings.


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    # A data URL (data:image/png;base64,...); http(s) only for hosts on the server's
    # allow-list (DSV2_IMAGE_URL_HOSTS). Checked by core/images.py, the same as gRPC's images.
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's tiling decides


class ImagePart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["image_url"]
    # {"url": ...} as OpenAI documents it; a bare URL string as some older clients send it.
    image_url: ImageURL | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]
    name: str | None = Field(default=None, max_length=64)

    def pieces(self) -> list[str | None]:
        """The content in order: text, or None where a picture goes."""
        if isinstance(self.content, str):
            return [self.content]
        return [p.text if isinstance(p, TextPart) else None for p in self.content]

    def image_urls(self) -> list[str]:
        if isinstance(self.content, str):
            return []
        return [p.url for p in self.content if isinstance(p, ImagePart)]

    def image_positions(self) -> list[int]:
        """Index in `content` of each image part (for error messages naming the field)."""
        if isinstance(self.content, str):
            return []
        return [i for i, p in enumerate(self.content) if isinstance(p, ImagePart)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


# OpenAI parameters this server does not implement, each with the values that ask for nothing
# (what clients send by default): anything else is refused with a 400 naming the field rather
# than silently ignored.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v in (None, True, False),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
}


class ChatCompletionRequest(BaseModel):
    # Unknown parameters are ignored (OpenAI adds some every year); the ones in UNSUPPORTED
    # that change what the client gets back are refused.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1, description="Only 1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user: str | None = Field(default=None, max_length=256)
    # Declared (not ignored) so refuse_unsupported sees them; see UNSUPPORTED.
    tools: Any = Field(default=None, description="Not supported: refused unless empty.")
    tool_choice: Any = Field(default=None, description='Not supported: only "none".')
    parallel_tool_calls: Any = None
    functions: Any = Field(default=None, description="Not supported: refused unless empty.")
    function_call: Any = Field(default=None, description='Not supported: only "none".')
    response_format: Any = Field(default=None, description='Only {"type": "text"}.')
    logprobs: Any = Field(default=None, description="Not supported: only false.")
    top_logprobs: Any = Field(default=None, description="Not supported: only 0.")
    logit_bias: Any = Field(default=None, description="Not supported: refused unless empty.")
    presence_penalty: Any = Field(default=None, description="Not supported: only 0.")
    frequency_penalty: Any = Field(default=None, description="Not supported: only 0.")
    audio: Any = Field(default=None, description="Not supported.")
    modalities: Any = Field(default=None, description='Only ["text"].')
    prediction: Any = Field(default=None, description="Not supported.")

    def refuse_unsupported(self) -> None:
        """400 naming the first OpenAI parameter given that this server cannot honour."""
        for name, harmless in UNSUPPORTED.items():
            value = getattr(self, name)
            try:
                ok = harmless(value)
            except Exception:  # e.g. comparing an unhashable value: not a harmless one
                ok = False
            if not ok:
                raise InvalidInput(
                    f"{name} is not supported by this server; remove it from the request.",
                    param=name,
                    code="unsupported_parameter",
                )


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
    # Sizes are checked by validation.check_session_fields (the same as gRPC's).
    model_config = ConfigDict(extra="forbid", strict=True)

    title: str | None = None
    system_prompt: str | None = None


class SessionOut(BaseModel):
    id: str
    title: str
    created_at: int
    updated_at: int


class MessageOut(BaseModel):
    id: str
    role: str
    # A plain string, or for a message with pictures OpenAI content parts (text parts and
    # image_url parts with data URLs), as it was sent.
    content: str | list[dict[str, Any]]
    created_at: int


class SessionDetail(SessionOut):
    messages: list[MessageOut]


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionOut]
    has_more: bool = False
    next_cursor: str | None = None  # pass as ?after= for the next page


class TurnRequest(BaseModel):
    # The content's size is checked by validation.check_turn_content (the same as gRPC's).
    model_config = ConfigDict(extra="forbid", strict=True)

    # Text, or OpenAI content parts (text and image_url parts, as in chat completions).
    content: str | list[ContentPart] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)

    def as_message(self) -> ChatMessageIn:
        return ChatMessageIn(role="user", content=self.content)


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
    images_per_day: QuotaOut
