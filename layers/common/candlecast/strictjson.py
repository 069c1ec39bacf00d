"""json.loads for text we did not write (request bodies, upstream answers), inside Python's own limits.

Refused as invalid JSON (JSONDecodeError, which the API answers with a 400): integers longer than
MAX_DIGITS digits (Python raises ValueError past 4300), NaN and Infinity, numbers that overflow a float,
duplicate object keys, and nesting deep enough to raise RecursionError.
"""

import json
import math
from typing import Any

MAX_DIGITS = 100  # no number we accept or read is anywhere near this long


def loads(text: str | bytes) -> Any:
    document = text.decode("utf-8", "replace") if isinstance(text, bytes | bytearray) else str(text)

    def refuse(problem: str) -> Any:
        raise json.JSONDecodeError(problem, document[:200], 0)

    def parse_int(literal: str) -> int:
        if len(literal.lstrip("-")) > MAX_DIGITS:
            refuse(f"an integer longer than {MAX_DIGITS} digits")
        return int(literal)

    def parse_float(literal: str) -> float:
        if len(literal) > MAX_DIGITS * 2:
            refuse(f"a number longer than {MAX_DIGITS * 2} characters")
        value = float(literal)
        if not math.isfinite(value):
            refuse("a number too large for a double")
        return value

    def parse_constant(name: str) -> Any:
        refuse(f"{name} is not a JSON number")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
        result: dict = {}
        for key, value in pairs:
            if key in result:
                refuse(f"duplicate key {key[:40]!r}")
            result[key] = value
        return result

    try:
        return json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant,
                          object_pairs_hook=unique_keys)
    except RecursionError:
        refuse("nested too deeply")
