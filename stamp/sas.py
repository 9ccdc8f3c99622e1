"""Shared access signatures (SAS): make and check the query-string tokens that
grant access to a container, a blob or a blob snapshot (service SAS) or to an
account's blob service (account SAS). Pure functions: no I/O, no clock (the
caller passes `now`).

Interface (what the HTTP server and `stamp disk grant-access` use):

    token = generate_blob_sas(account, key, container, blob, permission="r",
                              expiry=dt, snapshot=None, start=None, ip=None, protocol=None)
    token = generate_container_sas(account, key, container, permission="rl", expiry=dt)
    token = generate_account_sas(account, key, resource_types="co", permission="rl", expiry=dt)
    is_sas(query) -> bool                       # the request carries a SAS (has `sig`)
    verify(query, account=, key=, permission=, container=, blob=, snapshot=,
           client_ip=, https=, now=, policies=None) -> Sas
        # query: the request's decoded query parameters; permission: the letters
        # any one of which allows the operation ("r" to read, "cw" to create);
        # container None for service-level requests (list containers), blob None
        # for container-level ones. Raises SasError(status, code, detail).

Rules kept (as the Blob service does, for signed versions 2013-08-15 on):
- the string to sign depends on the signed version `sv` (service SAS: 16
  fields from 2020-12-06, without `ses` from 2018-11-09, without `sr` and the
  snapshot time from 2015-04-05, without `sip`/`spr` and with the canonical
  resource `/account/...` instead of `/blob/account/...` before 2015-02-21;
  account SAS: `ses` from 2020-12-06). The resource is the decoded name with
  the account once: `/blob/devstoreaccount1/vhds/disk 1.vhd`;
- `sr=bs` signs the request's `snapshot` parameter (it is not in the token),
  so a snapshot SAS opens that snapshot only; `sr=b` opens the blob and its
  snapshots; `sr=c` the container and every blob in it;
- the signature is compared in constant time, before any other check, and a
  mismatch is 403 AuthenticationFailed whose detail quotes the string to sign;
- then the time window (`st` <= now <= `se`), the source IP (`sip`, one
  address or an inclusive IPv4/IPv6 range), the protocol (`spr=https` refuses
  plain HTTP), the account SAS's service and resource type, and last the
  permission: each a 403 with the service's own code;
- permissions: letters from the resource's set, each once, in the set's
  order (`racwdxytmei` for a blob: "rw" is good, "wr" is refused);
- a stored access policy (`si`) fills `st`, `se` and `sp` from `policies`;
  a field given by both, or by neither for `se`/`sp`, is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from urllib.parse import quote

from .errors import AzureError

VERSION = "2026-10-06"  # the signed version tokens are made with (that of azure-storage-blob 12.31)
BLOB_PERMISSIONS = "racwdxytmei"  # service SAS on a blob or snapshot, in the SDK's order
CONTAINER_PERMISSIONS = "racwdxyltfmei"  # service SAS on a container
ACCOUNT_PERMISSIONS = "rwdxylacupfti"  # account SAS
RESOURCE_TYPES = "sco"  # account SAS: service, container, object
TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,7}))?)?Z)?")
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")

MESSAGES = {
    "AuthenticationFailed": "Server failed to authenticate the request. Make sure the value of Authorization "
                            "header is formed correctly including the signature.",
    "AuthorizationPermissionMismatch": "This request is not authorized to perform this operation using this "
                                       "permission.",
    "AuthorizationSourceIPMismatch": "This request is not authorized to perform this operation using this "
                                     "source IP {ip}.",
    "AuthorizationProtocolMismatch": "This request is not authorized to perform this operation using this protocol.",
    "AuthorizationResourceTypeMismatch": "This request is not authorized to perform this operation using this "
                                         "resource type.",
    "AuthorizationServiceMismatch": "This request is not authorized to perform this operation using this service.",
}


class SasError(AzureError):
    """A SAS that does not authorise the request: `status` (403), `code` (the
    service's error code), `detail` (AuthenticationErrorDetail for
    AuthenticationFailed, else "") and `message` (the service's message)."""

    def __init__(self, code: str, detail: str = "", *, ip: str = "", status: int = 403) -> None:
        self.code = code
        self.status = status
        self.detail = detail
        self.message = MESSAGES[code].format(ip=ip)
        super().__init__(detail or self.message)


@dataclass(frozen=True)
class Sas:
    """The fields of a verified SAS that the caller may still need."""

    kind: str  # "service" or "account"
    resource: str  # sr for a service SAS ("b", "bs", "bv", "c"); srt for an account SAS
    permission: str
    start: datetime | None
    expiry: datetime


@dataclass(frozen=True)
class AccessPolicy:
    """A stored access policy of a container (`si` names it); "" = not set."""

    start: str = ""
    expiry: str = ""
    permission: str = ""


# --- making tokens -------------------------------------------------------------------------------------------

def sign(key: bytes, string_to_sign: str) -> str:
    return base64.b64encode(hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).digest()).decode()


def format_time(t: datetime) -> str:
    """ISO 8601 UTC to the second, as SAS tokens carry it."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _encode(fields: Mapping[str, str]) -> str:
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in fields.items() if v)


def _when(t: datetime | str | None) -> str:
    if t is None:
        return ""
    return t if isinstance(t, str) else format_time(t)


def generate_blob_sas(account: str, key: bytes, container: str, blob: str, *, permission: str,
                      expiry: datetime | str | None, start: datetime | str | None = None,
                      snapshot: str | None = None, ip: str | None = None, protocol: str | None = None,
                      policy_id: str | None = None, version: str = VERSION) -> str:
    """A service SAS token for one blob (or one snapshot of it: the caller
    appends `snapshot=` to the URL as well)."""
    return _service_sas(account, key, container, blob, "bs" if snapshot else "b", permission, _when(expiry),
                        _when(start), snapshot or "", ip or "", protocol or "", policy_id or "", version)


def generate_container_sas(account: str, key: bytes, container: str, *, permission: str,
                           expiry: datetime | str | None, start: datetime | str | None = None,
                           ip: str | None = None, protocol: str | None = None, policy_id: str | None = None,
                           version: str = VERSION) -> str:
    return _service_sas(account, key, container, None, "c", permission, _when(expiry), _when(start), "",
                        ip or "", protocol or "", policy_id or "", version)


def _service_sas(account: str, key: bytes, container: str, blob: str | None, sr: str, sp: str, se: str, st: str,
                 snapshot: str, sip: str, spr: str, si: str, sv: str) -> str:
    fields = {"st": st, "se": se, "sp": sp, "sv": sv, "sr": sr, "sip": sip, "spr": spr, "si": si}
    sts = service_string_to_sign(fields, canonical_resource(sv, account, container, blob), snapshot)
    return _encode({**fields, "sig": sign(key, sts)})


def generate_account_sas(account: str, key: bytes, *, resource_types: str, permission: str,
                         expiry: datetime | str, start: datetime | str | None = None, services: str = "b",
                         ip: str | None = None, protocol: str | None = None, version: str = VERSION) -> str:
    fields = {"st": _when(start), "se": _when(expiry), "sp": permission, "sv": version, "ss": services,
              "srt": resource_types, "sip": ip or "", "spr": protocol or ""}
    return _encode({**fields, "sig": sign(key, account_string_to_sign(account, fields))})


# --- strings to sign -----------------------------------------------------------------------------------------

def canonical_resource(sv: str, account: str, container: str, blob: str | None) -> str:
    path = f"/{account}/{container}" + (f"/{blob}" if blob is not None else "")
    return path if sv < "2015-02-21" else "/blob" + path


def service_string_to_sign(q: Mapping[str, str], resource: str, snapshot: str) -> str:
    """The string a service SAS of signed version q["sv"] signs."""
    g = q.get
    sv = g("sv", "")
    head = [g("sp", ""), g("st", ""), g("se", ""), resource, g("si", "")]
    if sv >= "2015-04-05":
        head += [g("sip", ""), g("spr", "")]
    head.append(sv)
    if sv >= "2018-11-09":
        head += [g("sr", ""), snapshot]
    if sv >= "2020-12-06":
        head.append(g("ses", ""))
    return "\n".join(head + [g(k, "") for k in ("rscc", "rscd", "rsce", "rscl", "rsct")])


def account_string_to_sign(account: str, q: Mapping[str, str]) -> str:
    g = q.get
    sv = g("sv", "")
    fields = [account, g("sp", ""), g("ss", ""), g("srt", ""), g("st", ""), g("se", ""), g("sip", ""),
              g("spr", ""), sv]
    if sv >= "2020-12-06":
        fields.append(g("ses", ""))
    return "\n".join(fields) + "\n"


# --- checking a request's SAS --------------------------------------------------------------------------------

def is_sas(query: Mapping[str, str]) -> bool:
    return "sig" in query


def verify(query: Mapping[str, str], *, account: str, key: bytes, permission: str, container: str | None,
           blob: str | None, snapshot: str | None, client_ip: str, https: bool, now: datetime,
           policies: Mapping[str, AccessPolicy] | None = None) -> Sas:
    """Check that the SAS in `query` authorises the request; raise SasError if not."""
    q = _mandatory(query)
    if "ss" in q or "srt" in q:
        return _verify_account(q, account, key, permission, container, blob, client_ip, https, now)
    return _verify_service(q, account, key, permission, container, blob, snapshot, client_ip, https, now,
                           policies or {})


def _mandatory(query: Mapping[str, str]) -> dict[str, str]:
    q = dict(query)
    q["sig"] = q.get("sig", "").replace(" ", "+")  # a '+' left unencoded in the URL decodes as a space
    if any(k in q for k in ("skoid", "sktid", "saoid", "suoid")):
        raise _failed("User delegation SAS is not supported by this endpoint")
    sv = q.get("sv", "")
    if not DATE_RE.fullmatch(sv):
        raise _failed("sv is mandatory. Cannot be empty" if not sv else f"Invalid signed version sv={sv}")
    if sv < "2013-08-15":
        raise _failed(f"Signed version {sv} is not supported (2013-08-15 and later are)")
    return q


def _verify_service(q: dict[str, str], account: str, key: bytes, permission: str, container: str | None,
                    blob: str | None, snapshot: str | None, client_ip: str, https: bool, now: datetime,
                    policies: Mapping[str, AccessPolicy]) -> Sas:
    sv = q["sv"]
    sr = q.get("sr", "")
    if not sr:
        raise _failed("sr is mandatory. Cannot be empty")
    if container is None or (sr in ("b", "bs", "bv") and blob is None) or sr not in ("b", "bs", "bv", "c"):
        raise SasError("AuthorizationResourceTypeMismatch")
    signed = {"bs": snapshot or "", "bv": q.get("versionid", "")}.get(sr, "")
    resource = canonical_resource(sv, account, container, blob if sr != "c" else None)
    _check_signature(key, service_string_to_sign(q, resource, signed), q["sig"])
    st, se, sp = _policy_fields(q, policies)
    window = _check_window(st, se, now)
    _check_ip(q.get("sip", ""), client_ip)
    _check_protocol(q.get("spr", ""), https)
    _check_permission(sp, CONTAINER_PERMISSIONS if sr == "c" else BLOB_PERMISSIONS, permission)
    return Sas("service", sr, sp, *window)


def _verify_account(q: dict[str, str], account: str, key: bytes, permission: str, container: str | None,
                    blob: str | None, client_ip: str, https: bool, now: datetime) -> Sas:
    for name in ("sp", "ss", "srt", "se"):
        if not q.get(name):
            raise _failed(f"{name} is mandatory. Cannot be empty")
    _check_signature(key, account_string_to_sign(account, q), q["sig"])
    window = _check_window(q.get("st", ""), q["se"], now)
    _check_ip(q.get("sip", ""), client_ip)
    _check_protocol(q.get("spr", ""), https)
    if "b" not in q["ss"]:
        raise SasError("AuthorizationServiceMismatch")
    _check_letters(q["srt"], RESOURCE_TYPES, "srt")
    level = "s" if container is None else "c" if blob is None else "o"
    if level not in q["srt"]:
        raise SasError("AuthorizationResourceTypeMismatch")
    _check_permission(q["sp"], ACCOUNT_PERMISSIONS, permission)
    return Sas("account", q["srt"], q["sp"], *window)


def _failed(detail: str) -> SasError:
    return SasError("AuthenticationFailed", detail)


def _check_signature(key: bytes, sts: str, sig: str) -> None:
    if not hmac.compare_digest(sign(key, sts).encode(), sig.encode("utf-8", "surrogateescape")):
        raise _failed(f"Signature did not match. String to sign used was {sts}")


def _policy_fields(q: Mapping[str, str], policies: Mapping[str, AccessPolicy]) -> tuple[str, str, str]:
    st, se, sp = q.get("st", ""), q.get("se", ""), q.get("sp", "")
    si = q.get("si", "")
    if si:
        policy = policies.get(si)
        if policy is None:
            raise _failed(f"Access policy {si} is not found on the container")
        for mine, theirs, name in ((st, policy.start, "st"), (se, policy.expiry, "se"), (sp, policy.permission,
                                                                                          "sp")):
            if mine and theirs:
                raise _failed(f"{name} is given both in the SAS and in access policy {si}")
        st, se, sp = st or policy.start, se or policy.expiry, sp or policy.permission
    for value, name in ((se, "se"), (sp, "sp")):
        if not value:
            raise _failed(f"{name} is mandatory. Cannot be empty")
    return st, se, sp


def parse_time(value: str, name: str) -> datetime:
    """A SAS time: YYYY-MM-DD, or with Thh:mm[:ss[.fffffff]]Z; always UTC."""
    m = TIME.fullmatch(value)
    if m is None:
        raise _failed(f"{name} is not a valid ISO 8601 UTC time: {value}")
    y, mo, d, h, mi, s, frac = m.groups()
    try:
        return datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0),
                        int((frac or "0").ljust(7, "0")) // 10, tzinfo=UTC)
    except ValueError:
        raise _failed(f"{name} is not a valid ISO 8601 UTC time: {value}") from None


def _rfc1123(t: datetime) -> str:
    return format_datetime(t.astimezone(UTC), usegmt=True)


def _check_window(st: str, se: str, now: datetime) -> tuple[datetime | None, datetime]:
    start = parse_time(st, "st") if st else None
    expiry = parse_time(se, "se")
    if start is not None and expiry <= start:
        raise _failed(f"Signed expiry time [{_rfc1123(expiry)}] must be after signed start time "
                      f"[{_rfc1123(start)}]")
    if (start is not None and now < start) or now > expiry:
        begin = f"Start [{_rfc1123(start)}] - " if start is not None else ""
        raise _failed(f"Signature not valid in the specified time frame: {begin}Expiry [{_rfc1123(expiry)}] - "
                      f"Current [{_rfc1123(now)}]")
    return start, expiry


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(text.strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _check_ip(sip: str, client_ip: str) -> None:
    if not sip:
        return
    try:
        low_text, _, high_text = sip.partition("-")
        low = _address(low_text)
        high = _address(high_text) if high_text else low
        if low.version != high.version or high < low:  # type: ignore[operator]
            raise ValueError(sip)
    except ValueError:
        raise _failed(f"sip is not a valid IP address or range: {sip}") from None
    try:
        client = _address(client_ip)
    except ValueError:
        raise SasError("AuthorizationSourceIPMismatch", ip=client_ip) from None
    if client.version != low.version or not low <= client <= high:  # type: ignore[operator]
        raise SasError("AuthorizationSourceIPMismatch", ip=client_ip)


def _check_protocol(spr: str, https: bool) -> None:
    if spr not in ("", "https", "https,http", "http,https"):
        raise _failed(f"spr must be https or https,http: {spr}")
    if spr == "https" and not https:
        raise SasError("AuthorizationProtocolMismatch")


def _check_letters(value: str, allowed: str, name: str) -> None:
    """Each letter known, once, in the order of `allowed` (as the service wants)."""
    bad = "".join(c for c in value if c not in allowed)
    if bad:
        raise _failed(f"Signature fields not well formed: {name}={value} holds unknown letters {bad} "
                      f"(allowed, in this order: {allowed})")
    positions = [allowed.index(c) for c in value]
    if positions != sorted(set(positions)):
        raise _failed(f"Signature fields not well formed: {name}={value} must list its letters once each, "
                      f"in this order: {allowed}")


def _check_permission(sp: str, allowed: str, needed: str) -> None:
    _check_letters(sp, allowed, "sp")
    if not any(c in sp for c in needed):
        raise SasError("AuthorizationPermissionMismatch")
