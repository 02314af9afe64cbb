"""Grammars (GBNF) that sampling follows: the model can only produce text the grammar accepts,
so JSON mode always parses, a JSON schema is always met and a tool call is always valid JSON
for its function (llama-server does the same with the same converter). Schemas are converted
here, in Python; llama.cpp parses the result."""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

GRAMMARS_KEPT = 64  # schemas converted once, then reused (a client sends the same one each time)
MAX_GRAMMAR_BYTES = 256 * 1024  # what one request's grammar may be, as text
MAX_REPETITION = 2048  # a bounded length or count in a schema (maxLength, maxItems, x{n})
REPEATED = {"minLength", "maxLength", "minItems", "maxItems"}
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")
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
    _check_repetitions(schema)
    try:
        # As given: the converter writes the properties in the schema's order.
        grammar = _converted(json.dumps(schema))
    # The converter reports what it cannot express with assert, or fails on a bad shape.
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError,
            NotImplementedError, RecursionError) as error:
        message = str(error) or type(error).__name__
        # The converter's own advice is for its command line; here nothing is fetched.
        raise SchemaNotSupported(message.replace(
            " (use --allow-fetch for force)", ": put what it refers to in $defs")) from None
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise SchemaNotSupported(f"its grammar is {len(grammar)} bytes, over "
                                 f"{MAX_GRAMMAR_BYTES}; fewer or shorter bounded parts")
    return grammar


def _check_repetitions(schema: Any) -> None:
    """The converter writes a repetition out in full (maxLength 10⁹ would be 10⁹ rules): bound
    every count before it runs."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack += node
        elif isinstance(node, dict):
            for key, value in node.items():
                counts = ([value] if key in REPEATED and isinstance(value, int)
                          else [int(count) for pair in _QUANTIFIER.findall(value)
                                for count in pair if count]
                          if key == "pattern" and isinstance(value, str) else [])
                if any(count > MAX_REPETITION for count in counts):
                    raise SchemaNotSupported(
                        f"{key} {value!r} repeats more than {MAX_REPETITION} times, more than "
                        "a grammar holds here; bound it lower")
                stack.append(value)


@functools.lru_cache(maxsize=GRAMMARS_KEPT)
def _converted(schema: str) -> str:
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):
        # llama-cpp-python's converter leaves integer bounds out (a TODO of its own), so that
        # {"maximum": 99} would let 100 through; llama.cpp's C++ converter holds them.
        def visit(self, schema: Any, name: str) -> str:
            if (isinstance(schema, dict) and schema.get("type") == "integer"
                    and INTEGER_BOUNDS & schema.keys()):
                low, high = integer_bounds(schema)
                rule = name + "-" if name in RESERVED_NAMES else name or "root"  # as its own
                return self._add_rule(rule, f"({integer_range(low, high)}) space")
            return super().visit(schema, name)

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(json.loads(schema), "request"), "")
    return converter.format_grammar()


# ---- integer ranges --------------------------------------------------------------------------
INTEGER_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
# An open side is bounded here: 15 digits, within what JSON parsers read exactly.
LARGEST_INTEGER = 10**15 - 1


def integer_bounds(schema: dict[str, Any]) -> tuple[int, int]:
    """The integers a schema allows, as [low, high]."""
    low, high = -LARGEST_INTEGER, LARGEST_INTEGER
    if "minimum" in schema:
        low = max(low, math.ceil(schema["minimum"]))
    if "exclusiveMinimum" in schema:
        low = max(low, math.floor(schema["exclusiveMinimum"]) + 1)
    if "maximum" in schema:
        high = min(high, math.floor(schema["maximum"]))
    if "exclusiveMaximum" in schema:
        high = min(high, math.ceil(schema["exclusiveMaximum"]) - 1)
    if low > high:
        raise SchemaNotSupported(f"no integer meets {schema}")
    return low, high


def integer_range(low: int, high: int) -> str:
    """A GBNF expression of the integers from `low` to `high`, as JSON writes them."""
    alternatives = []
    if low < 0:
        alternatives += [f'"-" ({" | ".join(_naturals(max(1, -high), -low))})']
    if high >= 0:
        alternatives += _naturals(max(0, low), high)
    return " | ".join(alternatives)


def _naturals(low: int, high: int) -> list[str]:
    """Alternatives for low..high (0 <= low <= high), split into runs of one digit count."""
    runs = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        start = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        end = min(high, 10**digits - 1)
        runs += _same_length(str(start), str(end))
    return runs


def _same_length(low: str, high: str) -> list[str]:
    """Alternatives for the numbers low..high written with as many digits as each other."""
    if len(low) == 1:
        return [_digits(low, high)]
    rest = len(low) - 1
    if low[0] == high[0]:
        return [f'"{low[0]}" ({" | ".join(_same_length(low[1:], high[1:]))})']
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return [f"{_digits(low[0], high[0])} [0-9]{{{rest}}}"]
    runs = [f'"{low[0]}" ({" | ".join(_same_length(low[1:], "9" * rest))})']
    if int(high[0]) - int(low[0]) > 1:
        runs.append(f"{_digits(str(int(low[0]) + 1), str(int(high[0]) - 1))} [0-9]{{{rest}}}")
    runs.append(f'"{high[0]}" ({" | ".join(_same_length("0" * rest, high[1:]))})')
    return runs


def _digits(low: str, high: str) -> str:
    return f"[{low}]" if low == high else f"[{low}-{high}]"


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
