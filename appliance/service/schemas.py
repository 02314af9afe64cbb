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

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

MAX_STOP_LENGTH = 128
MAX_MESSAGES = 512
MAX_SCHEMA_BYTES = 64 * 1024  # a response_format schema, as JSON
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit for chat)
MAX_TOOLS = 64  # tool definitions one request may offer
MAX_TOOLS_BYTES = 64 * 1024  # all of them, as JSON: they are in the prompt and the grammar
MAX_TOOL_CALLS = 16  # calls in one assistant message
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


def _bounded_tools(tools: list[Any]) -> list[Any]:
    size = len(json.dumps([tool.model_dump(by_alias=True) for tool in tools]))
    if size > MAX_TOOLS_BYTES:
        raise ValueError(f"the tool definitions are {size} bytes as JSON, over "
                         f"{MAX_TOOLS_BYTES}")
    names = [tool.name for tool in tools]
    if len(set(names)) < len(names):
        raise ValueError("two tools have the same name")
    return tools


# A function's name, as OpenAI allows it: it is written into the grammar and the prompt.
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionDefinition(_Request):
    name: ToolName
    description: Text | None = Field(default=None, max_length=4096)
    # The JSON Schema its arguments meet; none: any JSON object.
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition

    @property
    def name(self) -> str:
        return self.function.name


class FunctionName(_Request):
    name: ToolName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


def _json_object(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError("the arguments are a JSON object, as text")
    return text


# A call's arguments as the SDKs send them: a JSON object's text.
Arguments = Annotated[Text, Field(max_length=MAX_TOOLS_BYTES), AfterValidator(_json_object)]


class FunctionCall(_Request):
    name: ToolName
    arguments: Arguments
    # The openai SDK's `parse` adds the arguments read into the caller's model; ignored.
    parsed_arguments: Any = None


class ToolCall(_Request):
    id: Text = Field(max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] = ""
    name: Text | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)
    tool_call_id: Text | None = Field(default=None, max_length=128)  # what a tool answers
    # What the SDKs put in an assistant message they hand back (`message.model_dump()`).
    refusal: Text | None = None
    parsed: Any = None  # the SDK's `parse`: the content read into the caller's model; ignored
    function_call: None = None
    audio: None = None
    annotations: list[dict[str, Any]] | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _tool_fields_with_their_roles(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls are an assistant message's")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message answers a call: it has tool_call_id, and only it")
        return self

    @property
    def text(self) -> str:
        return (self.content if isinstance(self.content, str)
                else "".join(part.text for part in self.content))


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS),
                     AfterValidator(_bounded_tools)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tool_choice_among_tools(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice == "required" and not self.tools:
            raise ValueError("tool_choice required needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                tool.name for tool in self.tools or []}:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not "
                             "among the tools")
        return self

    @property
    def tool_mode(self) -> str | None:
        """None (no tools offered, or "none"), "auto", "required", or a tool's name."""
        choice = self.tool_choice
        if not self.tools or choice == "none":
            return None
        if choice is None or isinstance(choice, str):
            return choice or "auto"
        return choice.function.name

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


MAX_EMBEDDING_INPUTS = 256  # texts one embeddings request may send


def _not_token_ids(value: Any) -> Any:
    # OpenAI's clients may send tiktoken's token ids; they mean nothing to this model's vocabulary.
    if isinstance(value, list) and value and (
            isinstance(value[0], int) or (isinstance(value[0], list) and value[0]
                                          and isinstance(value[0][0], int))):
        raise ValueError("token ids are another tokenizer's (OpenAI's); send the text "
                         "(LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))")
    return value


class EmbeddingRequest(_Request):
    model: Text | None = Field(default=None, max_length=256)
    input: Annotated[Annotated[Text, Field(min_length=1)]
                     | Annotated[list[Annotated[Text, Field(min_length=1)]],
                                 Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)],
                     BeforeValidator(_not_token_ids)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: Text | None = Field(default=None, max_length=256)

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


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


class FunctionCallItem(_Request):
    """A call the model made (an output item handed back as input)."""

    type: Literal["function_call"]
    call_id: Text = Field(max_length=128)
    name: ToolName
    arguments: Arguments
    id: Text | None = Field(default=None, max_length=128)
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def as_tool_call(self) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


class FunctionCallOutput(_Request):
    """What the caller's function returned."""

    type: Literal["function_call_output"]
    call_id: Text = Field(max_length=128)
    output: Text
    id: Text | None = Field(default=None, max_length=128)
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def as_chat_message(self) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": self.call_id, "content": self.output}


def _item_type(item: Any) -> str:
    kind = item.get("type") if isinstance(item, dict) else getattr(item, "type", None)
    return kind or "message"  # the easy form: a message without its type


InputItem = Annotated[Annotated[InputMessage, Tag("message")]
                      | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutput, Tag("function_call_output")],
                      Discriminator(_item_type)]


class ResponsesTool(FunctionDefinition):
    """The Responses API's function tool: chat's definition, flat."""

    type: Literal["function"]

    def as_chat_tool(self) -> dict[str, Any]:
        return {"type": "function", "function": self.model_dump(exclude={"type"},
                                                                 exclude_none=True)}


class NamedFunction(_Request):
    type: Literal["function"]
    name: ToolName


class TextFormat(JsonSchemaFormat):
    """The Responses API's `text.format`: chat's `response_format` with the schema inline."""

    type: Literal["text", "json_object", "json_schema"]


class TextOptions(_Request):
    format: TextFormat | None = None


class ResponsesRequest(_Request):
    model: Text | None = Field(default=None, max_length=256)
    input: Text | list[InputItem] = Field(min_length=1, max_length=MAX_MESSAGES)
    instructions: Text | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    text: TextOptions | None = None
    # Nothing is kept on the appliance: a stored response, or one to continue from, cannot be.
    store: Annotated[bool, AfterValidator(_nothing_kept)] | None = None
    previous_response_id: Annotated[Text, AfterValidator(_nothing_kept)] | None = None
    tools: list[ResponsesTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
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
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        for item in [] if isinstance(self.input, str) else self.input:
            if not isinstance(item, FunctionCallItem):
                messages.append(item.as_chat_message())
            # Calls follow the message they belong to: one assistant turn in chat.
            elif messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(item.as_tool_call())
            else:
                messages.append({"role": "assistant", "content": "",
                                 "tool_calls": [item.as_tool_call()]})
        body: dict[str, Any] = {"messages": messages,
                                "max_completion_tokens": self.max_output_tokens,
                                "temperature": self.temperature, "top_p": self.top_p,
                                "parallel_tool_calls": self.parallel_tool_calls}
        if self.tools:
            body["tools"] = [tool.as_chat_tool() for tool in self.tools]
        choice = self.tool_choice
        body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}}
                               if isinstance(choice, NamedFunction) else choice)
        chosen = self.format
        if chosen.type != "text":
            body["response_format"] = {"type": chosen.type}
            if chosen.type == "json_schema":
                body["response_format"]["json_schema"] = chosen.model_dump(
                    by_alias=True, exclude={"type"})
        return body
