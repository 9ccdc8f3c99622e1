"""Who may do what: Shared Key, Shared Key Lite, SAS and anonymous access.

Pure functions over the request's parts (verb, raw path, query, headers,
client address) and the accounts' keys; the caller looks up the container's
public access and stored policies first. Rules:
- Shared Key (versions 2009-09-19 on): the string to sign is the verb, eleven
  standard headers (Content-Length "" when 0), the x-ms-* headers lower-cased
  one per line, and the resource `/ACCOUNT` + the raw, still-encoded path,
  then each query parameter `\\nname:value` sorted by name. With path-style
  URLs the account appears twice. The SDK sorts the x-ms-* headers with a
  culture-aware compare (hyphens weigh nothing at the first level), so both
  that order and the plain ordinal one are accepted;
- Shared Key Lite: verb, Content-MD5, Content-Type, Date, the x-ms-* headers,
  and `/ACCOUNT/path` plus `?comp=` when present;
- a bad signature is 403 AuthenticationFailed whose detail quotes the string
  to sign, as the service does; every key of the account is tried;
- SAS (a `sig` parameter) is verified by stamp.sas (service and account SAS,
  time window, IP range, protocol, permission);
- no credentials: allowed only for reads where the container's public access
  says so (`blob`: blob reads; `container`: also the container's properties
  and listing); otherwise 404 ResourceNotFound for reads (the service does not
  say the resource exists) and 401 NoAuthenticationInformation for the rest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .. import sas
from ..errors import StampError
from .errors import RestError, from_stamp

DEVSTORE_ACCOUNT = "devstoreaccount1"
DEVSTORE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

STANDARD = ("Content-Encoding", "Content-Language", "Content-Length", "Content-MD5", "Content-Type", "Date",
            "If-Modified-Since", "If-Match", "If-None-Match", "If-Unmodified-Since", "Range")


@dataclass(frozen=True)
class Op:
    """What an operation needs: its level (service, container or object), the
    SAS permission letters any one of which allows it, and whether public
    access can allow it (`public`: "blob" or "container" level reads)."""

    name: str
    level: str
    permission: str
    public: str | None = None


@dataclass
class Request:
    """The parts of an HTTP request that authorization reads."""

    method: str
    raw_path: str  # still percent-encoded, without the query
    query: Sequence[tuple[str, str]]  # decoded, in order, repeats kept
    headers: Mapping[str, str]
    account: str
    container: str | None
    blob: str | None
    snapshot: str | None
    client_ip: str
    https: bool


@dataclass
class Accounts:
    """Account names and their keys (raw bytes; several keys each)."""

    keys: dict[str, list[bytes]] = field(default_factory=dict)

    @classmethod
    def default(cls) -> Accounts:
        return cls({DEVSTORE_ACCOUNT: [base64.b64decode(DEVSTORE_KEY)]})

    def add(self, account: str, key_b64: str) -> None:
        try:
            key = base64.b64decode(key_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"account {account!r}: its key is not base64") from None
        self.keys.setdefault(account, []).append(key)


def _failed(detail: str) -> RestError:
    return RestError(403, "AuthenticationFailed", AuthenticationErrorDetail=detail)


def _header_orders(headers: Mapping[str, str]) -> list[list[tuple[str, str]]]:
    xms = [(k.lower(), v) for k, v in headers.items() if k.lower().startswith("x-ms-")]
    ordinal = sorted(xms)
    culture = sorted(xms, key=lambda kv: (kv[0].replace("-", "").replace("_", "/"), kv[0]))
    return [ordinal] if culture == ordinal else [ordinal, culture]


def _canonical_headers(xms: list[tuple[str, str]]) -> str:
    return "".join(f"{k}:{v.strip()}\n" for k, v in xms)


def canonical_resource(req: Request) -> str:
    out = f"/{req.account}{req.raw_path}"
    params: dict[str, list[str]] = {}
    for k, v in req.query:
        params.setdefault(k.lower(), []).append(v)
    for k in sorted(params):
        out += f"\n{k}:{','.join(sorted(params[k]))}"
    return out


def shared_key_strings(req: Request) -> list[str]:
    """The strings to sign a Shared Key request may have (one per header order)."""
    std = []
    for name in STANDARD:
        value = req.headers.get(name, "")
        if name == "Content-Length" and value == "0":
            value = ""
        if name == "Date" and "x-ms-date" in req.headers:
            value = ""
        std.append(value)
    head = req.method + "\n" + "\n".join(std) + "\n"
    resource = canonical_resource(req)
    return [head + _canonical_headers(order) + resource for order in _header_orders(req.headers)]


def shared_key_lite_strings(req: Request) -> list[str]:
    date = "" if "x-ms-date" in req.headers else req.headers.get("Date", "")
    head = f"{req.method}\n{req.headers.get('Content-MD5', '')}\n{req.headers.get('Content-Type', '')}\n{date}\n"
    resource = f"/{req.account}{req.raw_path}"
    comp = [v for k, v in req.query if k.lower() == "comp"]
    if comp:
        resource += f"?comp={comp[0]}"
    return [head + _canonical_headers(order) + resource for order in _header_orders(req.headers)]


def sign(key: bytes, text: str) -> str:
    return base64.b64encode(hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()).decode()


def verify_shared_key(req: Request, accounts: Accounts) -> str:
    """Check the Authorization header; returns the scheme."""
    value = req.headers.get("Authorization", "")
    scheme, _, cred = value.partition(" ")
    if scheme not in ("SharedKey", "SharedKeyLite") or ":" not in cred:
        raise _failed(f"The authorization header {value[:80]!r} is not SharedKey or SharedKeyLite "
                      "ACCOUNT:SIGNATURE (other schemes are not supported by this endpoint).")
    account, _, sig = cred.partition(":")
    if account != req.account or account not in accounts.keys:
        raise _failed(f"The account {account!r} of the Authorization header is not the account of the URL or "
                      "is not known.")
    if "x-ms-date" not in req.headers and "Date" not in req.headers:
        raise _failed("Request date header not specified.")
    texts = shared_key_strings(req) if scheme == "SharedKey" else shared_key_lite_strings(req)
    for key in accounts.keys[account]:
        for text in texts:
            if hmac.compare_digest(sign(key, text).encode(), sig.strip().encode()):
                return scheme
    raise _failed(f"The MAC signature found in the HTTP request '{sig}' is not the same as any computed "
                  f"signature. Server used following string to sign: '{texts[0]}'.")


def verify_sas(req: Request, accounts: Accounts, op: Op, policies: Mapping[str, sas.AccessPolicy] | None,
               now: datetime | None = None) -> sas.Sas:
    keys = accounts.keys.get(req.account)
    if not keys:
        raise _failed(f"The account {req.account!r} is not known.")
    query = dict(req.query)
    error: StampError | None = None
    for key in keys:
        try:
            return sas.verify(query, account=req.account, key=key, permission=op.permission,
                              container=req.container if op.level != "service" else None,
                              blob=req.blob if op.level == "object" else None, snapshot=req.snapshot,
                              client_ip=req.client_ip, https=req.https, now=now or datetime.now(UTC),
                              policies=policies)
        except sas.SasError as e:
            if e.code != "AuthenticationFailed" or error is None:
                error = e
    assert error is not None
    raise from_stamp(error)


def authorize(req: Request, accounts: Accounts, op: Op, public_access: str | None = None,
              policies: Mapping[str, sas.AccessPolicy] | None = None) -> str:
    """How the request is allowed ("SharedKey", "SharedKeyLite", "sas",
    "anonymous"), or the service's error."""
    if "Authorization" in req.headers:
        return verify_shared_key(req, accounts)
    if any(k == "sig" for k, _ in req.query):
        verify_sas(req, accounts, op, policies)
        return "sas"
    allowed = op.public is not None and public_access is not None and \
        (public_access == "container" or op.public == "blob")
    if allowed:
        return "anonymous"
    if req.method in ("GET", "HEAD") and req.account in accounts.keys:
        raise RestError(404, "ResourceNotFound")
    raise RestError(401, "NoAuthenticationInformation")
