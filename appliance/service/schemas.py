"""Request bodies of the OpenAI-compatible API: a whitelist with bounds.

Only what is declared here reaches llama.cpp; an unknown field is a 400 rather than being
passed through (llama.cpp's server once took a negative `n_discard` to an out-of-bounds write).
A declared field sent as null means the field left out: the OpenAI SDKs and LangChain send
`logprobs: null`, `temperature: null`, `tools: null` by default. Fields for features that are
off (`logprobs: false`, `tools: []`, `tool_choice: "none"`, `store: false`) are accepted as such.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_LENGTH = 128
MAX_MESSAGES = 512
MAX_SCHEMA_BYTES = 64 * 1024  # a response_format schema, as JSON
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit for chat)
# llama.cpp's "pick a seed": what llama-server and llama-cpp-python take for random.
RANDOM_SEED = -1


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

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items()
                    if not (value is None and key in cls.model_fields)}
        return data


def _off(value: Any) -> Any:
    if value:
        raise ValueError("not served by this appliance: leave it out, null or empty")
    return value


def _nothing_kept(value: Any) -> Any:
    if value:
        raise ValueError("nothing is kept on this appliance (responses are not stored): send "
                         "the conversation as input, with store false or left out")
    return value


# Accepted only as "off": the features they switch on are not served.
Off = Annotated[bool, AfterValidator(_off)]
NoList = Annotated[list[Any], AfterValidator(_off)]


class JsonSchemaFormat(_Request):
    name: Text = Field(default="response", max_length=64)
    description: Text | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise ValueError(f"the schema is over {MAX_SCHEMA_BYTES} bytes as JSON")
        return schema


class ResponseFormat(_Request):
    """`text`; `json_object` (any JSON object); `json_schema` (JSON valid for the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        return self


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
    seed: int | None = Field(default=None, ge=RANDOM_SEED, le=2**32 - 2)
    stop: (Annotated[Text, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
           | list[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_LENGTH)]] | None) = None
    # llama-server's extension: generate exactly max_tokens (benchmarks need it).
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: Text | None = Field(default=None, max_length=256)
    response_format: ResponseFormat | None = None
    # Token id (as a string, as JSON keys are) to a bias added to its logit: -100 bans it.
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS)
    store: Off | None = None

    @property
    def sampling_seed(self) -> int | None:
        return None if self.seed == RANDOM_SEED else self.seed

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
    content: Text | list[TextPart] = ""
    name: Text | None = Field(default=None, max_length=64)
    # What the SDKs put in an assistant message they hand back (`message.model_dump()`).
    refusal: Text | None = None
    tool_calls: NoList | None = None
    function_call: None = None
    audio: None = None
    annotations: list[dict[str, Any]] | None = Field(default=None, max_length=64)

    def as_template_input(self) -> dict[str, str]:
        text = (self.content if isinstance(self.content, str)
                else "".join(part.text for part in self.content))
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: NoList | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def top_logprobs_wanted(self) -> int | None:
        """None without logprobs; else how many alternatives each token gets."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingParams):
    # LangChain's completions LLM sends a list; one prompt per request here (n is 1).
    prompt: (Annotated[Text, Field(min_length=1)]
             | Annotated[list[Annotated[Text, Field(min_length=1)]],
                         Field(min_length=1, max_length=1)])
    echo: Literal[False] = False
    # The legacy form: how many alternatives each token gets (OpenAI allows up to 5).
    logprobs: int | None = Field(default=None, ge=0, le=5)

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# The Responses API (POST /v1/responses): what a local model can do with it. It is served by
# the chat completion machinery: `as_chat` says which chat completion a request is.
class InputText(_Request):
    type: Literal["input_text", "output_text"]
    text: Text
    annotations: list[dict[str, Any]] | None = Field(default=None, max_length=64)


class InputMessage(_Request):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[InputText] = Field(max_length=MAX_MESSAGES)
    # What the SDK puts in an output item handed back as input.
    id: Text | None = Field(default=None, max_length=128)
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def as_chat_message(self) -> dict[str, Any]:
        text = (self.content if isinstance(self.content, str)
                else "".join(part.text for part in self.content))
        return {"role": self.role, "content": text}


class TextFormat(JsonSchemaFormat):
    """The Responses API's `text.format`: chat's `response_format` with the schema inline."""

    type: Literal["text", "json_object", "json_schema"]


class TextOptions(_Request):
    format: TextFormat | None = None


class ResponsesRequest(_Request):
    model: Text | None = Field(default=None, max_length=256)
    input: Text | list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    instructions: Text | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    text: TextOptions | None = None
    # Nothing is kept on the appliance: a stored response, or one to continue from, cannot be.
    store: Annotated[bool, AfterValidator(_nothing_kept)] | None = None
    previous_response_id: Annotated[Text, AfterValidator(_nothing_kept)] | None = None
    tools: NoList | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None
    metadata: dict[Annotated[str, Field(max_length=64)],
                   Annotated[Text, Field(max_length=512)]] | None = Field(default=None,
                                                                           max_length=16)
    user: Text | None = Field(default=None, max_length=256)

    @property
    def format(self) -> TextFormat:
        return (self.text.format if self.text and self.text.format
                else TextFormat(type="text"))

    def as_chat(self) -> dict[str, Any]:
        """The chat completion request body this request is."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions \
            else []
        messages += ([{"role": "user", "content": self.input}] if isinstance(self.input, str)
                     else [item.as_chat_message() for item in self.input])
        body: dict[str, Any] = {"messages": messages,
                                "max_completion_tokens": self.max_output_tokens,
                                "temperature": self.temperature, "top_p": self.top_p}
        chosen = self.format
        if chosen.type != "text":
            body["response_format"] = {"type": chosen.type}
            if chosen.type == "json_schema":
                body["response_format"]["json_schema"] = chosen.model_dump(
                    by_alias=True, exclude={"type"})
        return body
