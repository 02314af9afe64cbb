"""Grammars (GBNF) that sampling follows: the model can only produce text the grammar accepts,
so JSON mode always parses, a JSON schema is always met and a tool call is always valid JSON
for its function (llama-server does the same with the same converter). Schemas are converted
here, in Python; llama.cpp parses the result."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

GRAMMARS_KEPT = 64  # schemas converted once, then reused (a client sends the same one each time)
# The pieces of a GBNF line that are not rule names: string literals and character classes.
_NOT_NAMES = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')


class SchemaNotSupported(ValueError):
    """The converter cannot express this schema as a grammar; says which part."""


def response_grammar(kind: str, schema: dict[str, Any] | None = None) -> str | None:
    """The grammar for a response_format `type`: None for plain text."""
    from llama_cpp.llama_grammar import JSON_GBNF

    if kind == "json_object":
        return JSON_GBNF
    if kind == "json_schema":
        return schema_grammar(schema or {})
    return None


def schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of JSON valid for `schema`; SchemaNotSupported says what it cannot hold."""
    try:
        # As given: the converter writes the properties in the schema's order.
        return _converted(json.dumps(schema))
    # The converter reports what it cannot express with assert, or fails on a bad shape.
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError,
            NotImplementedError, RecursionError) as error:
        message = str(error) or type(error).__name__
        # The converter's own advice is for its command line; here nothing is fetched.
        raise SchemaNotSupported(message.replace(
            " (use --allow-fetch for force)", ": put what it refers to in $defs")) from None


@functools.lru_cache(maxsize=GRAMMARS_KEPT)
def _converted(schema: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(schema)


def literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    return json.dumps(text, ensure_ascii=False)


def renamed_root(grammar: str, name: str) -> str:
    """`grammar` with its `root` rule called `name`, to be used inside another grammar."""
    def rename(line: str) -> str:
        kept = _NOT_NAMES.findall(line)
        names = re.sub(r"(?<![\w-])root(?![\w-])", name, _NOT_NAMES.sub("\0", line))
        return re.sub("\0", lambda _: kept.pop(0), names)

    return "\n".join(rename(line) for line in grammar.splitlines())


def grammar_prefixed(grammar: str, text: str) -> str:
    """The grammar of `text` followed by what `grammar` accepts."""
    if not text:
        return grammar
    return f"{renamed_root(grammar, 'prefixed')}\nroot ::= {literal(text)} prefixed"
