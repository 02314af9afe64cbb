"""Tool calling: the tools into the prompt, the call held to a grammar, the answer read back as
OpenAI's `tool_calls`.

**How a model writes a call.** A chat template that carries tools teaches its model one way:
Qwen's (and Hermes') write `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
one block a call; Llama 3.x's answer with `{"name": ..., "parameters": {...}}` alone. Such a
template renders the tools and the history's calls itself. A template without tools gets the
generic format: the tool list in the system message, in Qwen's words and syntax, and the
history's calls and results written into the messages as text.

**The grammar.** Each call is held to a grammar made of its function's parameter schema, so
its JSON always parses and validates. With `tool_choice` "required" or a named function the
grammar applies from the first token; with "auto" the model writes freely until it opens a call
(the engine's grammar trigger), and that call is made again under the grammar.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from appliance.service.grammars import literal, renamed_root, schema_grammar
from appliance.service.schemas import MAX_TOOL_CALLS, ChatCompletionRequest, ChatMessage


class Syntax(StrEnum):
    HERMES = "hermes"  # <tool_call> blocks, one or more
    JSON = "json"  # the answer is one {"name": ..., "parameters": ...}


# Per syntax: the text a call begins with, and the key of its arguments.
OPENING = {Syntax.HERMES: "<tool_call>", Syntax.JSON: '{"name"'}
ARGUMENTS = {Syntax.HERMES: "arguments", Syntax.JSON: "parameters"}
HERMES_CLOSING = "</tool_call>"
# A block as Qwen's template writes one: the call's JSON on a line of its own.
_BLOCK_OPENING = literal(OPENING[Syntax.HERMES] + "\n")
_BLOCK_CLOSING = literal("\n" + HERMES_CLOSING)


# Where a call begins in the answer: the grammar's JSON may have space after its brace.
_CALL_START = {Syntax.HERMES: re.compile(re.escape(OPENING[Syntax.HERMES])),
               Syntax.JSON: re.compile(r'\{\s*"name"')}
# The longest tail of a text that may still become a call's beginning.
_CALL_START_TAIL = {Syntax.HERMES: re.compile("(?:" + "|".join(
                        re.escape(OPENING[Syntax.HERMES][:size])
                        for size in range(len(OPENING[Syntax.HERMES]) - 1, 0, -1)) + ")$"),
                    Syntax.JSON: re.compile(r'\{\s*(?:"(?:n(?:a(?:m(?:e)?)?)?)?)?$')}


@dataclass(frozen=True)
class ToolFormat:
    syntax: Syntax
    native: bool  # the chat template renders tools and calls itself

    @property
    def opening(self) -> str:
        """What the model writes to begin a call (the grammar's trigger)."""
        return OPENING[self.syntax]

    def call_start(self, text: str) -> int:
        """Where the first call begins in `text`; -1: none yet."""
        found = _CALL_START[self.syntax].search(text)
        return found.start() if found else -1

    def held_tail(self, text: str) -> int:
        """How much of the end of `text` may begin a call, and so is not words yet."""
        found = _CALL_START_TAIL[self.syntax].search(text)
        return len(found.group()) if found else 0


def tool_format(template: str | None) -> ToolFormat:
    """How the model with this chat template writes a call."""
    template = template or ""
    if "tools" in template and OPENING[Syntax.HERMES] in template:
        return ToolFormat(Syntax.HERMES, native=True)
    if "tools" in template and '"parameters"' in template and "tool_calls" in template:
        return ToolFormat(Syntax.JSON, native=True)
    return ToolFormat(Syntax.HERMES, native=False)


def _generic_instructions(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\nFor each function call, return a json object "
            "with function name and arguments within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>\nThe results come back within <tool_response></tool_response> tags.")


def _written_call(name: str, arguments: str) -> str:
    return (f'{OPENING[Syntax.HERMES]}\n{{"name": {json.dumps(name)}, "arguments": '
            f"{arguments}}}\n{HERMES_CLOSING}")


def chat_input(params: ChatCompletionRequest, form: ToolFormat
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(the messages, the tools) for the chat template."""
    offered = ([tool.model_dump(exclude_none=True) for tool in params.tools]
               if params.tool_mode is not None else None)
    if form.native:
        return [_native(message, form) for message in params.messages], offered
    messages: list[dict[str, Any]] = []
    for message in params.messages:
        role, text = ("system" if message.role == "developer" else message.role), message.text
        if message.tool_calls:
            text = "\n".join([text] * bool(text) + [
                _written_call(call.function.name, call.function.arguments)
                for call in message.tool_calls])
        if role == "tool":
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        # Templates that want turns to alternate (Gemma's) get one turn for several results.
        if messages and messages[-1]["role"] == role and role != "system":
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    if offered:
        instructions = _generic_instructions([tool["function"] for tool in offered])
        if messages[0]["role"] == "system":
            messages[0]["content"] += "\n\n" + instructions
        else:
            messages.insert(0, {"role": "system", "content": instructions})
    return messages, None


def _native(message: ChatMessage, form: ToolFormat) -> dict[str, Any]:
    # Chat templates know "system"; OpenAI's newer "developer" role means the same.
    rendered: dict[str, Any] = {"role": "system" if message.role == "developer"
                                else message.role, "content": message.text}
    if message.tool_calls:
        # Templates write the arguments with tojson: they want the object, not its text.
        rendered["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name,
                          "arguments": json.loads(call.function.arguments)}}
            for call in message.tool_calls]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
        # Llama 3's template writes a result with tojson: JSON text would be quoted again.
        if form.syntax is Syntax.JSON:
            with contextlib.suppress(ValueError):
                rendered["content"] = json.loads(message.text)
    return rendered


def call_grammar(params: ChatCompletionRequest, form: ToolFormat) -> tuple[str, str | None]:
    """(the grammar of the answer's calls, the trigger it waits for: None when the answer must
    be calls from its first token)."""
    mode = params.tool_mode
    assert mode is not None and params.tools
    chosen = [tool.function for tool in params.tools if mode in ("auto", "required")
              or tool.name == mode]
    key = ARGUMENTS[form.syntax]
    call = renamed_root(schema_grammar({"anyOf": [
        {"type": "object", "properties": {"name": {"const": tool.name}, key: tool.parameters},
         "required": ["name", key]} for tool in chosen]}), "tool-call")
    if form.syntax is Syntax.JSON:
        grammar = f"{call}\nroot ::= tool-call"
    else:
        block = f"tool-block ::= {_BLOCK_OPENING} tool-call {_BLOCK_CLOSING}"
        more = (f' ("\\n" tool-block){{0,{MAX_TOOL_CALLS - 1}}}'
                if params.parallel_tool_calls else "")
        grammar = f"{call}\n{block}\nroot ::= tool-block{more}"
    return grammar, form.opening if mode == "auto" else None


@dataclass(frozen=True)
class ToolCallOut:
    """A call the model made, as the API answers it."""

    id: str
    name: str
    arguments: str  # JSON text

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


class AnswerSplitter:
    """Splits generated text into the answer's words and its calls as it arrives: words are
    handed on at once, except a tail that may begin a call's opening."""

    def __init__(self, form: ToolFormat, calls_only: bool = False):
        """`calls_only`: the answer is calls from its first character (the grammar says so)."""
        self.form = form
        self._held = ""
        self.calls_text: str | None = "" if calls_only else None  # from the first call on

    def feed(self, piece: str) -> str:
        """The words to send now."""
        if self.calls_text is not None:
            self.calls_text += piece
            return ""
        self._held += piece
        at = self.form.call_start(self._held)
        if at >= 0:
            words, self.calls_text = self._held[:at], self._held[at:]
            self._held = ""
            return words
        keep = self.form.held_tail(self._held)
        words, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        return words

    def finish(self) -> tuple[str, list[ToolCallOut], bool]:
        """(the words still held, the calls, whether text after them did not read as a call:
        one cut off by max_tokens)."""
        if self.calls_text is None:
            return self._held, [], False
        calls, read = _read_calls(self.calls_text, self.form.syntax)
        return self._held, calls, bool(self.calls_text[read:].strip())


def _read_calls(text: str, syntax: Syntax) -> tuple[list[ToolCallOut], int]:
    """The calls at the start of `text`, and how many characters they took."""
    decoder, key, calls, read = json.JSONDecoder(), ARGUMENTS[syntax], [], 0
    while not (calls and syntax is Syntax.JSON):
        position = read
        if syntax is Syntax.HERMES:
            opening = text.find(OPENING[syntax], position)
            if opening < 0 or text[position:opening].strip():
                break
            position = opening + len(OPENING[syntax])
        position += len(text[position:]) - len(text[position:].lstrip())
        try:
            call, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            break
        if syntax is Syntax.HERMES:
            closing = text.find(HERMES_CLOSING, position)
            if closing < 0 or text[position:closing].strip():
                break
            position = closing + len(HERMES_CLOSING)
        calls.append(ToolCallOut(f"call_{uuid.uuid4().hex[:24]}", call["name"],
                                 json.dumps(call.get(key, {}), ensure_ascii=False)))
        read = position
    return calls, read
