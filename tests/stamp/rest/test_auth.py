"""Shared Key and Shared Key Lite: the signatures of requests the SDK sent
(captured and verified independently), a Lite request signed by hand from
the documented formula, and the service's answer to a bad signature."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import http.client
from urllib.parse import urlsplit

import pytest

from stamp.rest import DEVSTORE_KEY
from stamp.rest.auth import Accounts, Request, verify_shared_key
from stamp.rest.errors import RestError

PATH = "/devstoreaccount1/vhds/disk%201.vhd"


def _request(headers: dict[str, str]) -> Request:
    return Request("PUT", PATH, [("comp", "page")], headers, "devstoreaccount1", "vhds", "disk 1.vhd", None,
                   "127.0.0.1", False)


def test_captured_sdk_clear_page_signature_verifies():
    headers = {"x-ms-page-write": "clear", "Content-Length": "0", "x-ms-range": "bytes=0-511",
               "x-ms-version": "2026-10-06", "x-ms-date": "Sat, 21 Nov 2026 22:42:00 GMT",
               "x-ms-client-request-id": "c3e09e64-e5fc-11f1-9b71-02fc00000001",
               "Authorization": "SharedKey devstoreaccount1:kutqc0bMcynkLcLVqLtUgCdJDC0sDg6p/8QAks/vaPw="}
    assert verify_shared_key(_request(headers), Accounts.default()) == "SharedKey"


def test_captured_sdk_put_page_with_if_match_signature_verifies():
    headers = {"x-ms-page-write": "update", "Content-Length": "4194304", "Content-Type": "application/octet-stream",
               "If-Match": '"0x3FC82AB041057B"', "x-ms-range": "bytes=0-4194303", "x-ms-version": "2026-10-06",
               "x-ms-date": "Sat, 21 Nov 2026 22:42:00 GMT",
               "x-ms-client-request-id": "c3c32c44-e5fc-11f1-9b71-02fc00000001",
               "Authorization": "SharedKey devstoreaccount1:TwTejruTEy0wJH3fFSTdAsoju6uTxtme/a+HdyL9EQE="}
    assert verify_shared_key(_request(headers), Accounts.default()) == "SharedKey"


def test_a_changed_header_fails_and_the_detail_quotes_the_string_to_sign():
    headers = {"x-ms-page-write": "clear", "Content-Length": "0", "x-ms-range": "bytes=0-1023",
               "x-ms-version": "2026-10-06", "x-ms-date": "Sat, 21 Nov 2026 22:42:00 GMT",
               "x-ms-client-request-id": "c3e09e64-e5fc-11f1-9b71-02fc00000001",
               "Authorization": "SharedKey devstoreaccount1:kutqc0bMcynkLcLVqLtUgCdJDC0sDg6p/8QAks/vaPw="}
    with pytest.raises(RestError) as e:
        verify_shared_key(_request(headers), Accounts.default())
    err = e.value
    assert err.status == 403 and err.code == "AuthenticationFailed"
    detail = err.extra["AuthenticationErrorDetail"]
    assert "x-ms-range:bytes=0-1023\n" in detail and "/devstoreaccount1/devstoreaccount1/vhds/disk%201.vhd" in detail


def _raw(server, method: str, path: str, headers: dict[str, str], body: bytes = b""):
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def test_shared_key_lite_signed_by_hand(server):
    # the documented Shared Key Lite string: VERB, Content-MD5, Content-Type, Date, x-ms-* headers, resource
    date = email.utils.formatdate(usegmt=True)
    path = "/devstoreaccount1/lite-c"
    sts = f"PUT\n\n\n\nx-ms-date:{date}\nx-ms-version:2026-10-06\n/devstoreaccount1{path}"
    sig = base64.b64encode(hmac.new(base64.b64decode(DEVSTORE_KEY), sts.encode(), hashlib.sha256).digest()).decode()
    headers = {"x-ms-date": date, "x-ms-version": "2026-10-06", "Content-Length": "0",
               "Authorization": f"SharedKeyLite devstoreaccount1:{sig}"}
    resp, _ = _raw(server, "PUT", path + "?restype=container", headers)
    assert resp.status == 201
    headers["Authorization"] = f"SharedKeyLite devstoreaccount1:{sig[:-4]}AAA="
    resp, body = _raw(server, "PUT", path + "?restype=container", headers)
    assert resp.status == 403 and resp.getheader("x-ms-error-code") == "AuthenticationFailed"
    assert b"<AuthenticationErrorDetail>" in body and b"Server used following string to sign" in body


def test_unknown_account_and_missing_credentials(server):
    resp, _ = _raw(server, "PUT", "/devstoreaccount1/anon-c?restype=container", {"Content-Length": "0"})
    assert resp.status == 401 and resp.getheader("x-ms-error-code") == "NoAuthenticationInformation"
    resp, _ = _raw(server, "HEAD", "/devstoreaccount1/anon-c/blob", {})
    assert resp.status == 404 and resp.getheader("x-ms-error-code") == "ResourceNotFound"
