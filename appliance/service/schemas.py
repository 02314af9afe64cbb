"""Request bodies of the OpenAI-compatible API: a whitelist with bounds.

Only what is declared here reaches llama.cpp; an unknown field is a 400 rather than being
passed through (llama.cpp's server once took a negative `n_discard` to an out-of-bounds write).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_STOP_LENGTH = 128
MAX_MESSAGES = 512


def _encodable(text: str) -> str:
    # JSON may carry "\ud800" alone; such a string has no UTF-8 form, and the chat template and
    # the tokenizer would fail on it deep inside.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone surrogate (\\u{ord(text[exc.start]):04x}) at "
                         f"character {exc.start}: not text; send valid UTF-8") from None
    return text


# Every string of a request: text that has a UTF-8 form.
Text = Annotated[str, AfterValidator(_encodable)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingParams(_Request):
    """Fields shared by both completion endpoints."""

    model: Text | None = Field(default=None, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=1000)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, ge=0.5, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 2)
    stop: (Annotated[Text, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
           | list[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_LENGTH)]] | None) = None
    # llama-server's extension: generate exactly max_tokens (benchmarks need it).
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: Text | None = Field(default=None, max_length=256)

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def wants_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = Field(default=None, max_length=64)

    def as_template_input(self) -> dict[str, str]:
        text = (self.content if isinstance(self.content, str)
                else "".join(part.text for part in self.content))
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingParams):
    prompt: Text = Field(min_length=1)
    echo: Literal[False] = False

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
