"""`response_format` as a llama.cpp grammar (GBNF): sampling can only produce text the grammar
accepts, so JSON mode always parses and a JSON schema is always met (llama-server does the same
with the same converter). The schema is converted here, in Python; llama.cpp parses the result."""

from __future__ import annotations

import functools
import json
from typing import Any

GRAMMARS_KEPT = 64  # schemas converted once, then reused (a client sends the same one each time)


class SchemaNotSupported(ValueError):
    """The converter cannot express this schema as a grammar; says which part."""


def response_grammar(kind: str, schema: dict[str, Any] | None = None) -> str | None:
    """The grammar for a response_format `type`: None for plain text."""
    from llama_cpp.llama_grammar import JSON_GBNF

    if kind == "json_object":
        return JSON_GBNF
    if kind == "json_schema":
        try:
            return _schema_grammar(json.dumps(schema or {}, sort_keys=True))
        # The converter reports what it cannot express with assert, or fails on a bad shape.
        except (AssertionError, ValueError, KeyError, TypeError, AttributeError,
                NotImplementedError, RecursionError) as error:
            message = str(error) or type(error).__name__
            # The converter's own advice is for its command line; here nothing is fetched.
            raise SchemaNotSupported(message.replace(
                " (use --allow-fetch for force)", ": put what it refers to in $defs")) from None
    return None


@functools.lru_cache(maxsize=GRAMMARS_KEPT)
def _schema_grammar(schema: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(schema)
