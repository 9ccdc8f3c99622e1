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


def test_a_sas_cannot_open_a_container_to_the_public_or_delete_it(server):
    """A container's ACL is its owner's (Shared Key) only, and a service SAS on a
    container opens its blobs, not the container: a holder of a container SAS
    with w could make the container public (anyone could then list and read
    it), one with d could delete the container and every blob in it."""
    from datetime import UTC, datetime, timedelta

    from azure.storage.blob import (
        AccountSasPermissions,
        ContainerSasPermissions,
        ResourceTypes,
        generate_account_sas,
        generate_container_sas,
    )

    svc = server.service()
    name = "sas-acl"
    svc.create_container(name)
    expiry = datetime.now(UTC) + timedelta(hours=1)
    every = ContainerSasPermissions(read=True, write=True, delete=True, list=True)
    csas = generate_container_sas("devstoreaccount1", name, account_key=DEVSTORE_KEY, permission=every, expiry=expiry)
    asas = generate_account_sas("devstoreaccount1", DEVSTORE_KEY, ResourceTypes(container=True, object=True),
                                AccountSasPermissions(read=True, write=True, delete=True, list=True), expiry=expiry)
    path = f"/devstoreaccount1/{name}?restype=container"
    acl = b"<?xml version='1.0' encoding='utf-8'?><SignedIdentifiers />"
    for token in (csas, asas):
        resp, _ = _raw(server, "PUT", f"{path}&comp=acl&{token}", {"x-ms-blob-public-access": "container"}, acl)
        assert resp.status == 403 and resp.getheader("x-ms-error-code") == "AuthorizationPermissionMismatch"
        resp, _ = _raw(server, "GET", f"{path}&comp=acl&{token}", {})
        assert resp.status == 403 and resp.getheader("x-ms-error-code") == "AuthorizationPermissionMismatch"
    resp, _ = _raw(server, "GET", f"{path}&comp=list", {})
    assert resp.status == 404  # still private
    for method, query in (("DELETE", ""), ("PUT", "&comp=metadata")):
        resp, _ = _raw(server, method, f"{path}{query}&{csas}", {"x-ms-meta-a": "b"})
        assert resp.status == 403 and resp.getheader("x-ms-error-code") == "AuthorizationPermissionMismatch"
    resp, _ = _raw(server, "GET", f"{path}&comp=list&{csas}", {})
    assert resp.status == 200  # what a container SAS is for
    resp, _ = _raw(server, "PUT", f"{path}&comp=metadata&{asas}", {"x-ms-meta-a": "b"})
    assert resp.status == 200  # an account SAS manages containers
    resp, _ = _raw(server, "DELETE", f"{path}&{asas}", {})
    assert resp.status == 202


@pytest.mark.parametrize("age", [-3600 * 24 * 400, -20 * 60, 20 * 60])
def test_a_signed_request_cannot_be_sent_again_long_after_its_date(server, age):
    """Shared Key signs the request's date, and the service takes a request
    only within 15 minutes of it: a captured request (a delete, here) with a
    good signature but an old (or far future) date is refused, not replayed."""
    import time

    key = base64.b64decode(DEVSTORE_KEY)
    path = "/devstoreaccount1/replayed"

    def send(method: str, when: float, length: str = ""):
        date = email.utils.formatdate(when, usegmt=True)
        sts = (f"{method}\n\n\n{length}\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:2026-10-06\n"
               f"/devstoreaccount1{path}\nrestype:container")
        sig = base64.b64encode(hmac.new(key, sts.encode(), hashlib.sha256).digest()).decode()
        return _raw(server, method, path + "?restype=container", {
            "x-ms-date": date, "x-ms-version": "2026-10-06", "Content-Length": "0",
            "Authorization": f"SharedKey devstoreaccount1:{sig}"})[0]

    now = time.time()
    assert send("PUT", now).status in (201, 409)
    resp = send("DELETE", now + age)
    assert resp.status == 403 and resp.getheader("x-ms-error-code") == "AuthenticationFailed"
    assert send("PUT", now).status == 409  # still there
    assert send("DELETE", now - 60).status == 202  # a minute's skew is fine


def test_an_account_cannot_reach_another_accounts_containers(tmp_path):
    """Two accounts on one server: each lists, reads, writes, deletes and
    copies from its own containers only, even with a good signature of its
    own key and the other's container public."""
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
    from azure.storage.blob import BlobServiceClient

    from stamp import Stamp

    from .conftest import start_server, stop_server

    path = str(tmp_path / "st")
    Stamp.create(path).close()
    other_key = base64.b64encode(b"another account's key").decode()
    srv = start_server(path, "--account", f"other:{other_key}")
    try:
        mine = srv.service()
        theirs = BlobServiceClient(f"{srv.url}/other", credential={"account_name": "other", "account_key": other_key})
        cc = mine.create_container("private")
        cc.get_blob_client("b").create_page_blob(1024)
        cc.get_blob_client("b").upload_page(b"s" * 512, 0, 512)
        theirs.create_container("theirs")
        assert [c.name for c in theirs.list_containers()] == ["theirs"]
        assert [c.name for c in mine.list_containers()] == ["private"]
        stolen = theirs.get_blob_client("private", "b")
        for attempt in (stolen.download_blob, stolen.delete_blob, stolen.get_blob_properties,
                        lambda: stolen.upload_page(b"x" * 512, 0, 512),
                        lambda: theirs.get_container_client("private").get_container_properties(),
                        lambda: list(theirs.get_container_client("private").list_blobs()),
                        lambda: theirs.get_container_client("private").delete_container()):
            with pytest.raises(ResourceNotFoundError):
                attempt()
        copy = theirs.get_blob_client("theirs", "copy")
        with pytest.raises(HttpResponseError) as e:
            copy.start_copy_from_url(f"{srv.url}/other/private/b")
        assert e.value.status_code == 404
        assert not copy.exists()
        cc.set_container_access_policy({}, public_access="container")
        resp, _ = _raw(srv, "GET", "/other/private/b", {})  # anonymous, through the other account's name
        assert resp.status == 404
        assert cc.get_blob_client("b").download_blob().readall()[:512] == b"s" * 512
    finally:
        assert "Traceback" not in stop_server(srv)
