"""The XML bodies of the Blob service: errors, page lists, container and
blob listings, and the one request body this endpoint reads (a container's
stored access policies). Pure functions over plain values.

Shapes follow the service's own answers: a UTF-8 byte order mark, then
`<?xml version="1.0" encoding="utf-8"?>`; page lists interleave PageRange and
ClearRange in offset order with inclusive Start/End; listings carry RFC 1123
dates and unquoted Etags. Text taken from a request (a header's value in an
error, a Host, a prefix) may hold what XML 1.0 cannot carry (control
characters, the lone surrogates a non-UTF-8 header decodes to): each such
character is written as U+FFFD, and quotes are escaped, so a body is always
well-formed XML. A request body is parsed only when it is at most
MAX_XML bytes and holds no DOCTYPE (so no entity tricks), and a malformed one
is InvalidXmlDocument.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any
from xml.sax.saxutils import escape

from .. import sas
from .errors import RestError

HEAD = "\ufeff<?xml version=\"1.0\" encoding=\"utf-8\"?>"
MAX_XML = 64 * 1024  # bytes of a request's XML body (five stored policies need under 2 KiB)
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")  # what XML 1.0 cannot hold


def text(value: Any) -> str:
    """`value` as XML text or attribute content: escaped, quotes too, and
    characters XML cannot hold replaced by U+FFFD."""
    return escape(NOT_XML.sub("\ufffd", str(value)), {'"': "&quot;"})


def _el(name: str, value: Any) -> str:
    if value is None or value == "":
        return f"<{name} />"
    return f"<{name}>{text(value)}</{name}>"


def error(code: str, message: str, request_id: str, time: str, extra: dict[str, str]) -> bytes:
    body = "".join(_el(k, v) for k, v in extra.items())
    text = f"{message}\nRequestId:{request_id}\nTime:{time}"
    return f"{HEAD}<Error>{_el('Code', code)}{_el('Message', text)}{body}</Error>".encode()


def page_list(entries: Iterable[tuple[int, int, bool]], next_marker: str | None) -> bytes:
    """entries: (offset, length, cleared) in offset order."""
    return page_list_head() + page_entries(entries) + page_list_tail(next_marker)


def page_list_head() -> bytes:
    return (HEAD + "<PageList>").encode()


def page_entries(entries: Iterable[tuple[int, int, bool]]) -> bytes:
    """The PageRange and ClearRange elements of a page list, in the order given
    (a streamed page list is its head, these piece by piece, then its tail)."""
    parts = []
    for off, n, cleared in entries:
        tag = "ClearRange" if cleared else "PageRange"
        parts.append(f"<{tag}><Start>{off}</Start><End>{off + n - 1}</End></{tag}>")
    return "".join(parts).encode()


def page_list_tail(next_marker: str | None) -> bytes:
    return (_el("NextMarker", next_marker) + "</PageList>").encode()


def _metadata(meta: dict[str, str]) -> str:
    return "<Metadata>" + "".join(_el(k, v) for k, v in meta.items()) + "</Metadata>"


def container_list(endpoint: str, prefix: str, marker: str, limit: int | None,
                   containers: list[dict[str, Any]], with_metadata: bool, next_marker: str | None) -> bytes:
    parts = [HEAD, f'<EnumerationResults ServiceEndpoint="{text(endpoint)}">']
    parts += [_el("Prefix", prefix), _el("Marker", marker)]
    if limit is not None:
        parts.append(_el("MaxResults", limit))
    parts.append("<Containers>")
    for c in containers:
        props = "".join(_el(k, v) for k, v in c["properties"].items())
        meta = _metadata(c["metadata"]) if with_metadata else ""
        parts.append(f"<Container>{_el('Name', c['name'])}<Properties>{props}</Properties>{meta}</Container>")
    parts.append("</Containers>" + _el("NextMarker", next_marker) + "</EnumerationResults>")
    return "".join(parts).encode()


def blob_list(endpoint: str, container: str, prefix: str, marker: str, limit: int | None, delimiter: str,
              blobs: list[dict[str, Any]], prefixes: list[str], next_marker: str | None) -> bytes:
    """blobs: {name, snapshot?, properties: {element: value}, metadata?}, in listing order."""
    parts = [HEAD, f'<EnumerationResults ServiceEndpoint="{text(endpoint)}" '
                   f'ContainerName="{text(container)}">']
    parts += [_el("Prefix", prefix), _el("Marker", marker)]
    if limit is not None:
        parts.append(_el("MaxResults", limit))
    if delimiter:
        parts.append(_el("Delimiter", delimiter))
    parts.append("<Blobs>")
    items: list[tuple[str, dict[str, Any] | None]] = [(b["name"], b) for b in blobs]
    items += [(p, None) for p in prefixes]
    for name, item in sorted(items, key=lambda t: t[0]) if prefixes else items:
        if item is None:
            parts.append(f"<BlobPrefix>{_el('Name', name)}</BlobPrefix>")
            continue
        snap = _el("Snapshot", item["snapshot"]) if item.get("snapshot") else ""
        props = "".join(_el(k, v) for k, v in item["properties"].items())
        meta = _metadata(item["metadata"]) if "metadata" in item else ""
        parts.append(f"<Blob>{_el('Name', item['name'])}{snap}<Properties>{props}</Properties>{meta}</Blob>")
    parts.append("</Blobs>" + _el("NextMarker", next_marker) + "</EnumerationResults>")
    return "".join(parts).encode()


def signed_identifiers(policies: dict[str, dict[str, str]]) -> bytes:
    parts = [HEAD, "<SignedIdentifiers>"]
    for pid, p in policies.items():
        inner = "".join(_el(k, v) for k, v in (("Start", p.get("start")), ("Expiry", p.get("expiry")),
                                                ("Permission", p.get("permission"))) if v)
        parts.append(f"<SignedIdentifier>{_el('Id', pid)}<AccessPolicy>{inner}</AccessPolicy></SignedIdentifier>")
    return ("".join(parts) + "</SignedIdentifiers>").encode()


def _check_policy(policy: dict[str, str]) -> None:
    """A stored policy's times are SAS times and its permission letters a
    container's, each once (else 400 InvalidXmlNodeValue, as the service)."""
    for key, element in (("start", "Start"), ("expiry", "Expiry")):
        if policy[key]:
            try:
                sas.parse_time(policy[key], element)
            except sas.SasError:
                raise RestError(400, "InvalidXmlNodeValue", XmlNodeName=element,
                                XmlNodeValue=policy[key][:64]) from None
    letters = policy["permission"]
    if len(set(letters)) != len(letters) or not set(letters) <= set(sas.CONTAINER_PERMISSIONS):
        raise RestError(400, "InvalidXmlNodeValue", XmlNodeName="Permission", XmlNodeValue=letters[:64])


def parse_signed_identifiers(body: bytes) -> dict[str, dict[str, str]]:
    """A Set Container ACL body: at most 5 policies {id: {start, expiry, permission}}."""
    if not body.strip():
        return {}
    if len(body) > MAX_XML:
        raise RestError(413, "RequestBodyTooLarge", MaxLimit=str(MAX_XML))
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise RestError(400, "InvalidXmlDocument")
    try:
        root = ET.fromstring(body.decode("utf-8-sig"))
    except (ET.ParseError, UnicodeDecodeError, ValueError):
        raise RestError(400, "InvalidXmlDocument") from None
    if root.tag != "SignedIdentifiers":
        raise RestError(400, "InvalidXmlDocument")
    out: dict[str, dict[str, str]] = {}
    for si in root:
        pid = (si.findtext("Id") or "").strip()
        if si.tag != "SignedIdentifier" or not pid or len(pid) > 64:
            raise RestError(400, "InvalidXmlDocument")
        if pid in out:
            raise RestError(400, "InvalidXmlDocument", f"The stored access policy {pid[:64]} is given twice.")
        ap = si.find("AccessPolicy")
        fields = {"start": "Start", "expiry": "Expiry", "permission": "Permission"}
        out[pid] = {k: (ap.findtext(v) or "").strip() if ap is not None else "" for k, v in fields.items()}
        _check_policy(out[pid])
    if len(out) > 5:
        raise RestError(400, "InvalidXmlDocument", "At most 5 stored access policies are allowed.")
    return out
