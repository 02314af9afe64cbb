"""The OpenAI-compatible endpoints under /v1."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hmac
import json
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Request, Response, current_app, jsonify, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import BadRequest

from appliance.service.embeddings import CannotEmbed
from appliance.service.engine import (
    ClientGone,
    Engine,
    EngineState,
    GenerationStats,
    Lease,
    NotReady,
    QueueFull,
    QueueTimeout,
    Sampling,
    TokenLogprob,
)
from appliance.service.errors import ApiError
from appliance.service.grammars import SchemaNotSupported, response_grammar
from appliance.service.metrics import Metrics
from appliance.service.prompts import ControlTokenText, PromptTooLong, TemplateRefused
from appliance.service.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
    SamplingParams,
)
from appliance.service.tools import (
    AnswerSplitter,
    ToolCallOut,
    call_grammar,
    chat_input,
    tool_format,
)
from appliance.settings import VERIFICATION_HEADER, Settings

bp = Blueprint("api", __name__, url_prefix="/v1")

# Reasons our engine ends that OpenAI clients do not know are reported as the nearest one.
WIRE_FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "length"}


def _engine() -> Engine:
    return current_app.extensions["appliance.engine"]


def _metrics() -> Metrics:
    return current_app.extensions["appliance.metrics"]


def _settings() -> Settings:
    return current_app.extensions["appliance.settings"]


def _parse(model: type[BaseModel]) -> Any:
    # Only JSON: a web page may POST text/plain to any address without asking first (CORS
    # preflights only non-simple requests), so a keyless loopback service would run its prompts.
    if not request.is_json:
        raise ApiError(415, f"Content-Type must be application/json, not "
                            f"{request.mimetype or 'missing'}", "unsupported_media_type")
    try:
        body = request.get_json()
    except BadRequest:
        raise ApiError(400, "the request body is not valid JSON", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply to be a request",
                       "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, _problems(exc), "invalid_parameters") from None


def _problems(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "body"
        problems.append(f"{where}: {item['msg']}" if item["type"] != "extra_forbidden"
                        else f"{where}: unknown parameter")
    return "; ".join(problems)


@contextmanager
def _enforceable(where: str) -> Iterator[None]:
    try:
        yield
    except SchemaNotSupported as exc:
        raise ApiError(400, f"{where} cannot be enforced: {exc}", "unsupported_schema") from None


def _parsed(grammar: str | None, engine: Engine, where: str) -> str | None:
    if grammar is not None and not engine.grammar_parses(grammar):
        raise ApiError(400, f"{where} gives a grammar llama.cpp does not parse; simplify it",
                       "unsupported_schema")
    return grammar


def _grammar(params: SamplingParams, engine: Engine) -> str | None:
    response_format = params.response_format
    if response_format is None:
        return None
    schema = response_format.json_schema.schema_ if response_format.json_schema else None
    where = "response_format.json_schema.schema"
    with _enforceable(where):
        return _parsed(response_grammar(response_format.type, schema), engine, where)


def _logit_bias(params: SamplingParams, engine: Engine) -> tuple[tuple[int, float], ...]:
    bias = tuple((int(token), value) for token, value in (params.logit_bias or {}).items())
    unknown = [token for token, _ in bias if token >= engine.vocabulary_size]
    if unknown:
        raise ApiError(400, f"logit_bias: token {unknown[0]} is not in the model's vocabulary "
                            f"(0 to {engine.vocabulary_size - 1})", "invalid_parameters")
    return bias


def _sampling(params: SamplingParams, requested: int | None, stops: tuple[str, ...],
              engine: Engine, top_logprobs: int | None) -> Sampling:
    limits = _settings().limits
    if requested is not None and requested > limits.max_tokens:
        raise ApiError(400, f"max_tokens = {requested} exceeds this server's cap of "
                            f"{limits.max_tokens} (limits.max_tokens)", "max_tokens_too_large")
    if len(params.stop_sequences) > limits.max_stop_sequences:
        raise ApiError(400, f"at most {limits.max_stop_sequences} stop sequences are allowed",
                       "too_many_stop_sequences")
    return Sampling(
        max_tokens=requested or limits.request_default_tokens,
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, repeat_penalty=params.repeat_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        seed=params.sampling_seed, stop=tuple(params.stop_sequences) + stops,
        ignore_eos=params.ignore_eos, grammar=_grammar(params, engine),
        logit_bias=_logit_bias(params, engine), top_logprobs=top_logprobs,
    )


def _ready_engine() -> Engine:
    engine = _engine()
    if engine.facts is None or engine.state is not EngineState.READY:
        raise ApiError(503, f"the model is not ready ({engine.state.value}); see GET /health",
                       "model_not_ready", {"Retry-After": "5"})
    return engine


def _acquire(completion: _Completion) -> Lease:
    engine = completion.engine
    estimate = engine.estimate_seconds(len(completion.prompt), completion.sampling.max_tokens)
    return _leased(engine, estimate, completion.client_gone)


def _leased(engine: Engine, estimate: float, client_gone: Callable[[], bool]) -> Lease:
    """The model, or the API's answer for why not (a full queue, a timeout, ...)."""
    try:
        return engine.acquire(estimate, client_gone)
    except ClientGone:
        # Nobody reads this answer; the status (nginx's "client closed request") is for the
        # metrics.
        raise ApiError(499, "the client closed the connection while queued",
                       "client_closed_request") from None
    except QueueFull as exc:
        raise ApiError(429, f"{exc}", "queue_full",
                       {"Retry-After": str(exc.retry_after)}) from None
    except QueueTimeout as exc:
        raise ApiError(503, f"{exc}", "queue_timeout",
                       {"Retry-After": str(exc.retry_after)}) from None
    except NotReady as exc:
        raise ApiError(503, f"the model is not ready ({exc})", "model_not_ready",
                       {"Retry-After": "5"}) from None


def _client_gone() -> Callable[[], bool]:
    # waitress offers this when it watches the socket while the app runs.
    check = request.environ.get("waitress.client_disconnected")
    return check if callable(check) else (lambda: False)


def is_verification(incoming: Request) -> bool:
    """Requests of `pi-appliance verify` (authenticated like any other, and carrying this
    instance's verification token); they are measured by the verifier and kept out of the
    user-facing metrics."""
    presented = incoming.headers.get(VERIFICATION_HEADER, "")
    return hmac.compare_digest(presented.encode(),
                               current_app.extensions["appliance.verification_token"].encode())


def _record(metrics: Metrics | None, completion: _Completion) -> None:
    if metrics is None:  # a verification request
        return
    stats = completion.stats
    if completion.constraint is not None:
        metrics.constrained_generations.labels(completion.constraint).inc()
    metrics.tool_calls.inc(len(completion.calls))
    metrics.prompt_tokens.inc(stats.prompt_tokens)
    metrics.generated_tokens.inc(stats.completion_tokens)
    metrics.generation_seconds.inc(stats.generation_seconds)
    if stats.time_to_first_token is not None:
        metrics.time_to_first_token.observe(stats.time_to_first_token)
    if stats.decode_tokens_per_second is not None:
        metrics.generation_rate.observe(stats.decode_tokens_per_second)


def _usage(stats: GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.total_tokens}


def _token_entry(text: bytes, logprob: float) -> dict[str, Any]:
    return {"token": text.decode(errors="replace"), "logprob": logprob, "bytes": list(text)}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class _Completion:
    """One request's generation, rendered as a chat or a text completion."""

    def __init__(self, kind: str, prompt: list[int], sampling: Sampling, usage_in_stream: bool,
                 splitter: AnswerSplitter | None = None, constraint: str | None = None):
        self.kind = kind
        # With tools offered: what tells the answer's words from its calls.
        self.splitter = splitter
        self.constraint = constraint  # what the grammar is for, as the metrics count it
        self.calls: list[ToolCallOut] = []
        self.call_cut = False  # the last call was cut off (by max_tokens): it is left out
        self.prompt = prompt
        self.sampling = sampling
        self.usage_in_stream = usage_in_stream
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        # Captured now: a streamed body is produced after the request context has gone.
        self.engine = _engine()
        self.metrics = None if is_verification(request) else _metrics()
        self.client_gone = _client_gone()
        self.model = self.engine.facts.id  # type: ignore[union-attr]
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self._reported = 0  # logprob records already sent
        self._text_offset = 0

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def _choice(self, text: str | None, finish: str | None, *, streaming: bool,
                logprobs: list[TokenLogprob] | None = None,
                delta: dict[str, Any] | None = None) -> dict:
        if self.kind == "chat" and streaming:
            body = {"delta": delta if delta is not None
                    else {} if text is None else {"content": text}}
        elif self.kind == "chat":
            body = {"message": {"role": "assistant", "content": text}}
            if self.calls:
                body["message"]["tool_calls"] = [call.as_dict() for call in self.calls]
        else:
            body = {"text": text or ""}
        return {"index": 0, **body, "logprobs": self._logprobs(logprobs),
                "finish_reason": finish}

    def _logprobs(self, records: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """The chat form (`content`: one entry per token) or the legacy completions form."""
        if self.sampling.top_logprobs is None or records is None:
            return None
        if self.kind == "chat":
            return {"content": [{**_token_entry(record.text, record.logprob), "top_logprobs": [
                _token_entry(text, logprob) for text, logprob in record.top]}
                for record in records], "refusal": None}
        offsets, at = [], self._text_offset
        for record in records:
            offsets.append(at)
            at += len(record.text.decode(errors="replace"))
        self._text_offset = at
        return {"tokens": [record.text.decode(errors="replace") for record in records],
                "token_logprobs": [record.logprob for record in records],
                "top_logprobs": [{text.decode(errors="replace"): logprob
                                  for text, logprob in record.top} for record in records],
                "text_offset": offsets}

    def _new_logprobs(self) -> list[TokenLogprob]:
        """The records of the tokens decoded since the last call (a stream's next chunk)."""
        records = self.stats.logprobs[self._reported:]
        self._reported += len(records)
        return records

    def _envelope(self, choices: list[dict], suffix: str = "") -> dict[str, Any]:
        return {"id": self.id, "object": self.object_name + suffix, "created": self.created,
                "model": self.model, "choices": choices}

    def run(self, lease: Lease) -> Iterator[str]:
        """The answer's words as they are generated; its calls are in `calls` at the end."""
        pieces = self.engine.generate(lease, self.prompt, self.sampling, self.stats,
                                      self.client_gone)
        if self.splitter is None:
            yield from pieces
            return
        for piece in pieces:
            if words := self.splitter.feed(piece):
                yield words
        words, self.calls, self.call_cut = self.splitter.finish()
        if words:
            yield words

    @property
    def finish_reason(self) -> str:
        if self.calls and not self.call_cut:
            return "tool_calls"
        return WIRE_FINISH_REASONS[self.stats.finish_reason]

    def whole(self, lease: Lease) -> dict[str, Any]:
        text = "".join(self.run(lease))
        choice = self._choice(text or (None if self.calls else ""), self.finish_reason,
                              streaming=False, logprobs=self._new_logprobs())
        return {**self._envelope([choice]), "usage": _usage(self.stats)}

    def events(self, lease: Lease) -> Iterator[str]:
        suffix = ".chunk" if self.kind == "chat" else ""
        if self.kind == "chat":
            opening = self._choice(None, None, streaming=True)
            opening["delta"] = {"role": "assistant", "content": ""}
            yield _sse(self._envelope([opening], suffix))
        for piece in self.run(lease):
            yield _sse(self._envelope([self._choice(piece, None, streaming=True,
                                                    logprobs=self._new_logprobs())], suffix))
        # A call as the SDKs assemble one: its id and name, then its arguments.
        for index, call in enumerate(self.calls):
            opening = call.as_dict()
            opening["function"] = {"name": call.name, "arguments": ""}
            for delta in ({"tool_calls": [{"index": index, **opening}]},
                          {"tool_calls": [{"index": index,
                                           "function": {"arguments": call.arguments}}]}):
                yield _sse(self._envelope([self._choice(None, None, streaming=True,
                                                        delta=delta)], suffix))
        yield _sse(self._envelope([self._choice(None, self.finish_reason, streaming=True,
                                                logprobs=self._new_logprobs())], suffix))
        if self.usage_in_stream:
            yield _sse({**self._envelope([], suffix), "usage": _usage(self.stats)})
        yield _sse("[DONE]")


def _respond(completion: _Completion, stream: bool) -> Response:
    lease = _acquire(completion)
    if not stream:
        try:
            body = completion.whole(lease)
        finally:
            lease.release()
            _record(completion.metrics, completion)
        return jsonify(body)

    def events() -> Iterator[str]:
        try:
            yield from completion.events(lease)
        finally:
            lease.release()
            _record(completion.metrics, completion)

    response = Response(events(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # A stream closed before its first chunk never runs the generator's finally.
    response.call_on_close(lease.release)
    return response


@contextmanager
def _prompt_errors() -> Iterator[None]:
    try:
        yield
    except PromptTooLong as exc:
        raise ApiError(400, str(exc), "context_length_exceeded") from None
    except ControlTokenText as exc:
        raise ApiError(400, str(exc), "control_token_text") from None
    except TemplateRefused as exc:
        raise ApiError(400, str(exc), "template_refused") from None


def _prompt_checked(engine: Engine, prompt: list[int], sampling: Sampling) -> Sampling:
    with _prompt_errors():
        budget = engine.token_budget(len(prompt), sampling.max_tokens)
    return dataclasses.replace(sampling, max_tokens=budget)


def _constraint(params: SamplingParams) -> str | None:
    """What the generation's grammar is for, if it has one."""
    kind = params.response_format.type if params.response_format else None
    return None if kind == "text" else kind


def _chat_completion(params: ChatCompletionRequest, top_logprobs: int | None,
                     make: Callable[..., _Completion]) -> _Completion:
    """The chat completion a request asks for; `make` builds it from its prompt, sampling,
    answer splitter and constraint."""
    engine = _ready_engine()
    form = tool_format(engine.chat_template)
    messages, tools = chat_input(params, form)
    with _prompt_errors():
        prompt, template_stops = engine.chat_prompt(messages, tools)
    sampling = _sampling(params, params.requested_max_tokens, template_stops, engine,
                         top_logprobs)
    constraint, splitter = _constraint(params), None
    if params.tool_mode is not None:
        if sampling.grammar is not None:
            raise ApiError(400, "response_format and tools cannot be asked for together: "
                                "the answer is held to one grammar; give the structure as a "
                                "tool's parameters", "invalid_parameters")
        with _enforceable("a tool's parameters"):
            grammar, trigger = call_grammar(params, form)
        sampling = dataclasses.replace(
            sampling, grammar=_parsed(grammar, engine, "the tools' parameters"),
            grammar_trigger=trigger)
        constraint, splitter = "tools", AnswerSplitter(form, calls_only=trigger is None)
    return make(prompt, _prompt_checked(engine, prompt, sampling), splitter, constraint)


@bp.post("/chat/completions")
def chat_completions() -> Response:
    params: ChatCompletionRequest = _parse(ChatCompletionRequest)
    completion = _chat_completion(
        params, params.top_logprobs_wanted,
        lambda prompt, sampling, splitter, constraint: _Completion(
            "chat", prompt, sampling, params.wants_usage_in_stream, splitter, constraint))
    return _respond(completion, params.stream)


@bp.post("/completions")
def completions() -> Response:
    params: CompletionRequest = _parse(CompletionRequest)
    engine = _ready_engine()
    with _prompt_errors():
        prompt = engine.text_prompt(params.prompt_text)
    sampling = _sampling(params, params.requested_max_tokens, (), engine,
                         params.top_logprobs_wanted)
    completion = _Completion("text", prompt, _prompt_checked(engine, prompt, sampling),
                             params.wants_usage_in_stream, constraint=_constraint(params))
    return _respond(completion, params.stream)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


class _Response(_Completion):
    """A chat completion rendered as the Responses API's response and its stream of events."""

    def __init__(self, params: ResponsesRequest, prompt: list[int], sampling: Sampling,
                 splitter: AnswerSplitter | None, constraint: str | None):
        super().__init__("chat", prompt, sampling, False, splitter, constraint)
        self.params = params
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self._sequence = 0

    def _message(self, text: str, status: str) -> dict[str, Any]:
        content = [_text_part(text)] if status != "in_progress" else []
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant",
                "content": content}

    @staticmethod
    def _call(call: ToolCallOut, status: str = "completed") -> dict[str, Any]:
        return {"id": f"fc_{call.id.removeprefix('call_')}", "type": "function_call",
                "status": status, "call_id": call.id, "name": call.name,
                "arguments": call.arguments if status == "completed" else ""}

    def _output(self, text: str, status: str) -> list[dict[str, Any]]:
        message = [self._message(text, status)] if text or not self.calls else []
        return message + [self._call(call) for call in self.calls]

    def _response(self, status: str, text: str | None = None) -> dict[str, Any]:
        params = self.params
        chosen = params.format.model_dump(by_alias=True, exclude_unset=True)
        finished = status != "in_progress"
        choice = params.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": None, "model": self.model,
            "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete"
                                   else None),
            "instructions": params.instructions, "max_output_tokens": params.max_output_tokens,
            "temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
            "text": {"format": chosen},
            "tools": [tool.model_dump(exclude_none=True) for tool in params.tools or []],
            "tool_choice": (choice.model_dump() if isinstance(choice, BaseModel)
                            else choice or ("auto" if params.tools else "none")),
            "parallel_tool_calls": params.parallel_tool_calls, "store": False,
            "truncation": "disabled", "metadata": params.metadata or {}, "user": params.user,
            "output": self._output(text or "", status) if finished else [],
            "usage": self._usage() if finished else None,
        }

    def _usage(self) -> dict[str, Any]:
        stats = self.stats
        return {"input_tokens": stats.prompt_tokens, "output_tokens": stats.completion_tokens,
                "total_tokens": stats.total_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}}

    def _status(self) -> str:
        return ("completed" if self.stats.finish_reason == "stop" or self.calls
                else "incomplete")

    def whole(self, lease: Lease) -> dict[str, Any]:
        text = "".join(self.run(lease))
        return self._response(self._status(), text)

    def _event(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\n" + _sse(event)

    def _message_opened(self) -> Iterator[str]:
        yield self._event("response.output_item.added", output_index=0,
                          item=self._message("", "in_progress"))
        yield self._event("response.content_part.added", item_id=self.item_id, output_index=0,
                          content_index=0, part=_text_part(""))

    def events(self, lease: Lease) -> Iterator[str]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        yield self._event("response.created", response=self._response("in_progress"))
        yield self._event("response.in_progress", response=self._response("in_progress"))
        pieces: list[str] = []
        for piece in self.run(lease):
            if not pieces:  # the message is opened by its first words: calls may come alone
                yield from self._message_opened()
            pieces.append(piece)
            yield self._event("response.output_text.delta", **where, delta=piece)
        text, status = "".join(pieces), self._status()
        if pieces or not self.calls:
            if not pieces:
                yield from self._message_opened()
            yield self._event("response.output_text.done", **where, text=text)
            yield self._event("response.content_part.done", **where, part=_text_part(text))
            yield self._event("response.output_item.done", output_index=0,
                              item=self._message(text, status))
        first = 1 if pieces or not self.calls else 0
        for index, call in enumerate(self.calls, start=first):
            item = self._call(call)
            yield self._event("response.output_item.added", output_index=index,
                              item=self._call(call, "in_progress"))
            yield self._event("response.function_call_arguments.delta", item_id=item["id"],
                              output_index=index, delta=call.arguments)
            yield self._event("response.function_call_arguments.done", item_id=item["id"],
                              output_index=index, arguments=call.arguments)
            yield self._event("response.output_item.done", output_index=index, item=item)
        yield self._event(f"response.{status}", response=self._response(status, text))


@bp.post("/responses")
def responses() -> Response:
    params: ResponsesRequest = _parse(ResponsesRequest)
    try:
        chat = ChatCompletionRequest.model_validate(params.as_chat())
    except ValidationError as exc:  # what input and text.format became, checked as a chat's
        raise ApiError(400, _problems(exc), "invalid_parameters") from None
    return _respond(_chat_completion(chat, None, functools.partial(_Response, params)),
                    params.stream)


@bp.post("/embeddings")
def embeddings() -> Response:
    params: EmbeddingRequest = _parse(EmbeddingRequest)
    engine = _ready_engine()
    model = engine.facts.id  # type: ignore[union-attr]  # a ready engine has its facts
    try:
        with _prompt_errors():
            tokens = engine.embedding_tokens(params.texts)
    except CannotEmbed:
        raise ApiError(400, f"the model {model!r} does not embed: its GGUF file "
                            "declares no pooling; serve an embedding model, or set "
                            "model.embedding_pooling (mean, cls or last) to pool this one's "
                            "hidden states", "model_cannot_embed") from None
    dimensions = engine.embedding_dimensions
    if params.dimensions not in (None, dimensions):
        raise ApiError(400, f"dimensions: this model's vectors have {dimensions}; it cannot "
                            "shorten them", "invalid_parameters")
    count = sum(map(len, tokens))
    estimate = count / (engine.prompt_tokens_per_second or 100.0)
    client_gone = _client_gone()
    lease = _leased(engine, estimate, client_gone)
    try:
        vectors = engine.embed(lease, tokens, client_gone)
    finally:
        lease.release()
    if vectors is None:
        raise ApiError(503, "the service is shutting down", "model_not_ready",
                       {"Retry-After": "5"})
    if not is_verification(request):
        _metrics().embedding_tokens.inc(count)
    return jsonify({"object": "list", "model": model, "data": [
        {"object": "embedding", "index": index,
         "embedding": (base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                       if params.encoding_format == "base64" else vector)}
        for index, vector in enumerate(vectors)],
        "usage": {"prompt_tokens": count, "total_tokens": count}})


def _model_entry() -> dict[str, Any]:
    facts = _ready_engine().facts
    assert facts is not None
    return {"id": facts.id, "object": "model", "created": 0, "owned_by": "pi-llm-appliance",
            "meta": {"sha256": facts.sha256, "quantization": facts.quantization,
                     "context": facts.context, "parameters": facts.parameters}}


@bp.get("/models")
def models() -> Response:
    return jsonify({"object": "list", "data": [_model_entry()]})


@bp.get("/models/<path:model_id>")
def model(model_id: str) -> Response:
    entry = _model_entry()
    if model_id != entry["id"]:
        raise ApiError(404, f"no model {model_id!r} here; this appliance serves "
                            f"{entry['id']!r} (GET /v1/models)", "model_not_found")
    return jsonify(entry)
