"""Request headers and query values, parsed by the service's rules. Pure.

Each parser takes the raw text and returns a value or raises the service's
error naming the header or parameter (InvalidHeaderValue with HeaderName and
HeaderValue, InvalidQueryParameterValue, MissingRequiredHeader). Rules:
- ranges are `bytes=START-END` (inclusive) or `bytes=START-`; `x-ms-range`
  wins over `Range` when both are sent;
- dates are RFC 1123 (`Sat, 21 Nov 2026 22:42:00 GMT`);
- `x-ms-version` is any date from 2009-09-19 on (echoed, never refused for
  being new);
- metadata names are C# identifiers (the service's rule), values printable
  ASCII (a header's other bytes do not survive the way back);
- numbers are ASCII digits (str.isdigit also takes "²" and "٥", which int()
  refuses or reads).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping

from .errors import header_error, missing_header, query_error

RANGE = re.compile(r"^bytes=(\d{1,20})-(\d{0,20})$", re.ASCII)
VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$", re.ASCII)
META_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$", re.ASCII)
MAX_METADATA = 8 * 1024  # bytes of names and values together (the service's limit)
GUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$", re.ASCII)


def http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def parse_date(name: str, value: str) -> float:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        raise header_error(name, value) from None
    if parsed is None or parsed.tzinfo is None:
        raise header_error(name, value)
    return parsed.timestamp()


def parse_range(headers: Mapping[str, str]) -> tuple[str, int, int | None] | None:
    """(header name, start, inclusive end or None) of x-ms-range or Range, or None."""
    for name in ("x-ms-range", "Range"):
        value = headers.get(name)
        if value is None:
            continue
        m = RANGE.match(value.strip())
        if not m:
            raise header_error(name, value)
        start, end = int(m.group(1)), int(m.group(2)) if m.group(2) else None
        if end is not None and end < start:
            raise header_error(name, value)
        return name, start, end
    return None


def page_range(headers: Mapping[str, str]) -> tuple[int, int]:
    """Put Page's (offset, length): a range with both ends, 512-aligned."""
    parsed = parse_range(headers)
    if parsed is None:
        raise missing_header("x-ms-range")
    name, start, end = parsed
    if end is None or start % 512 or (end + 1) % 512:
        raise header_error(name, headers[name])
    return start, end - start + 1


def version(headers: Mapping[str, str]) -> str:
    value = headers.get("x-ms-version", "")
    if value and (not VERSION.match(value) or value < "2009-09-19"):
        raise header_error("x-ms-version", value)
    return value


def integer(headers: Mapping[str, str], name: str, lo: int, hi: int, default: int | None = None,
            required: bool = False) -> int | None:
    value = headers.get(name)
    if value is None:
        if required:
            raise missing_header(name)
        return default
    try:
        n = int(value.strip())
    except ValueError:
        raise header_error(name, value) from None
    if not lo <= n <= hi or not digits(value.strip().lstrip("-")):
        raise header_error(name, value)
    return n


def digits(value: str) -> bool:
    """A whole number in ASCII digits (not "", "²" or "٥")."""
    return value.isascii() and value.isdigit()


def _printable(value: str) -> bool:
    return value.isascii() and (value.isprintable() or all(ch.isprintable() or ch == "\t" for ch in value))


def query_int(query: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    if not digits(value) or not lo <= int(value) <= hi:
        raise query_error(name, value)
    return int(value)


def metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """x-ms-meta-NAME headers -> {NAME: value} (names keep their case)."""
    out: dict[str, str] = {}
    total = 0
    for key, value in headers.items():
        if not key.lower().startswith("x-ms-meta-"):
            continue
        name = key[len("x-ms-meta-"):]
        if not META_NAME.match(name) or name.lower() in (k.lower() for k in out) or not _printable(value):
            raise header_error(key, value, "InvalidMetadata")
        total += len(name) + len(value)
        if total > MAX_METADATA:
            raise header_error(key, value[:64], "MetadataTooLarge")
        out[name] = value
    return out


def lease_id(headers: Mapping[str, str], name: str = "x-ms-lease-id") -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    if not GUID.match(value.strip()):
        raise header_error(name, value)
    return value.strip()


def now() -> float:
    return time.time()
