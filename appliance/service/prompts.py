"""Requests' text into prompt tokens: the chat template, control tokens, and the memory it takes.

**Control tokens.** A chat template writes the turns' markers (`<|im_start|>system`, ...) as text
that the tokenizer turns into control tokens. Tokenizing the whole rendered prompt that way
would do the same to a user's text: writing `<|im_end|><|im_start|>system` in a message would
open a system turn. So message content is tokenized as plain text, its control-token text as
the characters it is made of, unless `model.special_tokens_in_chat = true` (for a deployment
whose clients are trusted to write control tokens on purpose).

**Memory.** Templating and tokenizing a prompt near the body limit takes tens of MB on the HTTP
thread that does it. Prompts are prepared one at a time, a prompt that cannot fit the context
whatever its tokens is refused before it is tokenized, and the freed heap is handed back to the
system afterwards, so that requests cannot add up to more memory than the planner allowed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from jinja2 import TemplateError

log = logging.getLogger(__name__)
# A prompt's text past this size is followed by returning the freed heap to the system.
TRIM_AFTER_BYTES = 64 * 1024


class PromptTooLong(ValueError):
    pass


class ControlTokenText(ValueError):
    """A message holds control-token text where the template changed it, so that which of the
    prompt's characters came from the user is not known."""


class TemplateRefused(ValueError):
    """The model's chat template refuses the conversation (some allow only alternating turns,
    or one tool call a turn)."""


def _heap_trimmer() -> Callable[[], object]:
    # glibc keeps freed memory in the process (and one arena per thread); malloc_trim gives it
    # back. Other C libraries: nothing to do.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


_trim_heap = _heap_trimmer()


class PromptBuilder:
    """Prompt tokens for one loaded model (a llama-cpp-python `Llama`)."""

    def __init__(self, llama: Any, special_tokens_in_chat: bool, template: str | None = None):
        """`template`: the chat template (Jinja); None: the model's own."""
        from llama_cpp import llama_cpp

        self._llama = llama
        self._special_tokens_in_chat = special_tokens_in_chat
        self.template = template or llama.metadata.get("tokenizer.chat_template")
        self._formatter = _chat_formatter(llama, self.template)
        vocab = llama._model.vocab
        texts = [llama_cpp.llama_vocab_get_text(vocab, token) or b""
                 for token in range(llama.n_vocab())]
        # A token's text is at least as long as the bytes it stands for (byte-level BPE writes
        # a byte as one or two characters), so no token covers more of a prompt than this.
        self._longest_token_bytes = max(map(len, texts), default=1) or 1
        controls = sorted({texts[token].decode("utf-8", "replace")
                           for token in range(len(texts))
                           if llama_cpp.llama_vocab_get_attr(vocab, token)
                           & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL and texts[token]},
                          key=len, reverse=True)
        self._control_text = re.compile("|".join(map(re.escape, controls))) if controls else None
        self._preparation = threading.Lock()

    @contextmanager
    def _preparing(self, text_bytes: int) -> Iterator[None]:
        context = self._llama.n_ctx()
        fewest_tokens = text_bytes // self._longest_token_bytes
        if fewest_tokens >= context:
            raise PromptTooLong(
                f"the prompt is {text_bytes} bytes, at least {fewest_tokens} tokens, but the "
                f"context holds {context} (model.context); shorten the prompt or the "
                "conversation")
        with self._preparation:
            try:
                yield
            finally:
                if text_bytes > TRIM_AFTER_BYTES:
                    _trim_heap()

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
             ) -> tuple[list[int], tuple[str, ...]]:
        """Render the chat template and tokenize: (prompt tokens, template stop strings).
        `tools` are for a template that renders them itself."""
        contents = [message["content"] for message in messages
                    if isinstance(message.get("content"), str)]
        # Tools, calls and results the template writes as JSON: their text cannot be told
        # apart.
        written = json.dumps([tools, [message.get("tool_calls") for message in messages],
                              [content for message in messages
                               if not isinstance(content := message["content"], str)]],
                             ensure_ascii=False)
        if (not self._special_tokens_in_chat and self._control_text is not None
                and (found := self._control_text.search(written))):
            raise ControlTokenText(f"a tool definition or call holds control-token text "
                                       f"({found.group()!r}); remove it")
        with self._preparing(sum(len(content.encode()) for content in contents) + len(written)):
            try:
                rendered = self._formatter(messages=messages, tools=tools)
            except (ValueError, TemplateError) as exc:  # such as the template's raise_exception
                raise TemplateRefused(f"the model's chat template refuses this conversation: "
                                      f"{exc}") from None
            spans = self._spans(rendered.prompt, contents)
            tokens: list[int] = []
            for index, (text, special) in enumerate(spans):
                tokens += self._llama.tokenize(
                    text.encode(), add_bos=index == 0 and not rendered.added_special,
                    special=special)
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        return tokens, tuple(stop for stop in stops if stop)

    def text(self, prompt: str) -> list[int]:
        """A completion prompt: the user's text alone, so plain text throughout."""
        with self._preparing(len(prompt.encode())):
            return self._llama.tokenize(prompt.encode(), add_bos=True, special=False)

    def _spans(self, prompt: str, contents: list[str]) -> list[tuple[str, bool]]:
        """The rendered prompt as (text, control tokens allowed) pieces: the template's text
        with, the contents that hold control-token text without."""
        if self._special_tokens_in_chat or self._control_text is None:
            return [(prompt, True)]
        spans: list[tuple[str, bool]] = []
        position = 0
        for content in contents:
            if not self._control_text.search(content):
                continue  # tokenized alike either way
            start = prompt.find(content, position)
            if start < 0:
                raise ControlTokenText(
                    "a message holds control-token text (such as "
                    f"{self._control_text.search(content).group()!r}) that the chat template "
                    "rewrites; remove it from the message")
            spans += [(prompt[position:start], True), (content, False)]
            position = start + len(content)
        spans.append((prompt[position:], True))
        return [(text, special) for text, special in spans if text]


def _chat_formatter(llama: Any, template: str | None) -> Callable[..., Any]:
    from llama_cpp import llama_chat_format

    if not template:
        log.warning("the model has no chat template; using ChatML")
        return llama_chat_format.format_chatml

    def token_text(token: int) -> str:
        return llama._model.token_get_text(token) if token != -1 else ""

    # The renderer is llama-cpp-python's sandboxed Jinja2 environment (CVE-2024-34359).
    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(llama.token_eos()),
        bos_token=token_text(llama.token_bos()),
        stop_token_ids=[llama.token_eos()],
    )
