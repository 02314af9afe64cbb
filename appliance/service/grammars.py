"""`response_format` as a llama.cpp grammar (GBNF): sampling can only produce text the grammar
accepts, so JSON mode always parses and a JSON schema is always met (llama-server does the same
with the same converter). The schema is converted here, in Python; llama.cpp parses the result."""

from __future__ import annotations

import json
from typing import Any


class SchemaNotSupported(ValueError):
    """The converter cannot express this schema as a grammar; says which part."""


def response_grammar(kind: str, schema: dict[str, Any] | None = None) -> str | None:
    """The grammar for a response_format `type`: None for plain text."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if kind == "json_object":
        return JSON_GBNF
    if kind == "json_schema":
        try:
            return json_schema_to_gbnf(json.dumps(schema or {}))
        # The converter reports what it cannot express with assert, or fails on a bad shape.
        except (AssertionError, ValueError, KeyError, TypeError, AttributeError,
                NotImplementedError, RecursionError) as error:
            message = str(error) or type(error).__name__
            # The converter's own advice is for its command line; here nothing is fetched.
            raise SchemaNotSupported(message.replace(
                " (use --allow-fetch for force)", ": put what it refers to in $defs")) from None
    return None
