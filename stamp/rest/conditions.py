"""Conditional headers: If-Match, If-None-Match, If-Modified-Since,
If-Unmodified-Since (RFC 7232 as the Blob service applies them) and the page
blob sequence-number conditions. Pure: the caller passes the resource's
ETag and Last-Modified (None when it does not exist).

Rules: a failed condition on a write is 412 ConditionNotMet; on a read
(GET, HEAD) a failed If-None-Match or If-Modified-Since is 304 (no body).
If-Match on a missing resource fails. Times compare at whole seconds, the
precision of an HTTP date. x-ms-if-sequence-number-le/lt/eq pass when the
blob's number is <=, < or == the value, else 412
SequenceNumberConditionNotMet.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import RestError, header_error
from .headers import digits, parse_date

SEQ_MAX = 2 ** 63 - 1


def _etags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _not_met(read: bool, soft: bool) -> RestError:
    if read and soft:
        return RestError(304, "ConditionNotMet", "The condition specified using HTTP conditional header(s) "
                         "is not met for a read operation.")
    return RestError(412, "ConditionNotMet")


def check(headers: Mapping[str, str], etag: str | None, modified: float | None, read: bool = False) -> None:
    """Raise the service's error if a conditional header fails."""
    match = headers.get("If-Match")
    if match is not None and (etag is None or (match.strip() != "*" and etag not in _etags(match))):
        raise _not_met(read, soft=False)
    none_match = headers.get("If-None-Match")
    if none_match is not None and etag is not None and (none_match.strip() == "*" or etag in _etags(none_match)):
        raise _not_met(read, soft=True)
    since = headers.get("If-Modified-Since")
    if since is not None:
        t = parse_date("If-Modified-Since", since)
        if modified is not None and int(modified) <= int(t):
            raise _not_met(read, soft=True)
    unmodified = headers.get("If-Unmodified-Since")
    if unmodified is not None:
        t = parse_date("If-Unmodified-Since", unmodified)
        if modified is not None and int(modified) > int(t):
            raise _not_met(read, soft=False)


def check_sequence(headers: Mapping[str, str], seq: int) -> None:
    for name, ok in (("x-ms-if-sequence-number-le", lambda v: seq <= v),
                     ("x-ms-if-sequence-number-lt", lambda v: seq < v),
                     ("x-ms-if-sequence-number-eq", lambda v: seq == v)):
        value = headers.get(name)
        if value is None:
            continue
        if not digits(value.strip()) or int(value) > SEQ_MAX:
            raise header_error(name, value)
        if not ok(int(value)):
            raise RestError(412, "SequenceNumberConditionNotMet")
