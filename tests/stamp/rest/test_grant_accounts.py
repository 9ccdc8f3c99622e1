"""A managed disk's grant belongs to the account it was issued for: its SAS is
signed with that account's key (the CLI takes it from STAMP/accounts.json, as
`stamp serve` does), and only that account's URL serves it. Another account's
URL, with a SAS its own key signed naming the grant's policy, finds no such
container (404), so no other account's key opens the disk."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient, generate_blob_sas

from stamp import Stamp
from stamp.rest import DEVSTORE_ACCOUNT, DEVSTORE_KEY

from .conftest import start_server, stop_server

OTHER = "acct2"
OTHER_KEY = base64.b64encode(b"k" * 64).decode()


@pytest.fixture(scope="module")
def two_accounts(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("accounts") / "st")
    Stamp.create(path, extent_size=4 << 20).close()
    with open(f"{path}/accounts.json", "w") as f:
        json.dump({OTHER: OTHER_KEY}, f)
    srv = start_server(path)
    yield srv
    assert "Traceback" not in stop_server(srv)


def cli(server, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stamp", "--stamp", server.stamp, *args], capture_output=True,
                          text=True, env=env)


def grant(server, disk: str, account: str) -> str:
    cli(server, "disk", "create", disk, "--size-gib", "1")
    got = cli(server, "disk", "grant-access", disk, "--access", "Read", "--duration", "600", "--endpoint",
              f"{server.url}/{account}")
    assert got.returncode == 0, got.stderr
    return got.stdout.strip()


def as_account(url: str, account: str, key: str) -> str:
    """The grant's blob under `account`'s URL, with a SAS `key` signed naming the grant's policy."""
    parts = urlsplit(url)
    _, _, container, blob = parts.path.split("/")
    policy = parse_qs(parts.query)["si"][0]
    token = generate_blob_sas(account, container, blob, account_key=key, policy_id=policy)
    return f"{parts.scheme}://{parts.netloc}/{account}/{container}/{blob}?{token}"


def test_a_grant_on_another_account_is_signed_with_its_key_and_served_there(two_accounts):
    url = grant(two_accounts, "g2", OTHER)
    assert urlsplit(url).path.startswith(f"/{OTHER}/md-")
    assert BlobClient.from_blob_url(url).get_blob_properties().size == (1 << 30) + 512


@pytest.mark.parametrize("issued, reached, key", [(OTHER, DEVSTORE_ACCOUNT, DEVSTORE_KEY),
                                                  (DEVSTORE_ACCOUNT, OTHER, OTHER_KEY)])
def test_a_grant_is_not_served_under_another_account(two_accounts, issued, reached, key):
    url = grant(two_accounts, f"x-{issued}", issued)
    assert BlobClient.from_blob_url(url).get_blob_properties().size
    forged = as_account(url, reached, key)
    with pytest.raises(HttpResponseError) as e:
        BlobClient.from_blob_url(forged).get_blob_properties()
    assert e.value.status_code == 404
    with pytest.raises(HttpResponseError) as e:
        BlobClient.from_blob_url(forged).download_blob(offset=0, length=512).readall()
    assert e.value.status_code == 404 and e.value.error_code == "ContainerNotFound"


def test_a_grant_for_an_account_without_a_key_is_refused_clearly(two_accounts):
    cli(two_accounts, "disk", "create", "nokey", "--size-gib", "1")
    got = cli(two_accounts, "disk", "grant-access", "nokey", "--access", "Read", "--duration", "60", "--endpoint",
              f"{two_accounts.url}/nobody")
    assert got.returncode != 0 and "no key for account 'nobody'" in got.stderr and "Traceback" not in got.stderr
    with Stamp.open(two_accounts.stamp) as st:
        from stamp.disks import Disks

        assert Disks(st).record("nokey")["state"] == "Unattached"


def test_only_the_grant_s_own_sas_opens_it_not_another_the_account_key_signs(two_accounts):
    """Shared Key is refused on a grant's container; so is any SAS but the
    one naming the grant's policy: an account SAS or a service SAS of its own
    window, though the account's key signed them, as the platform's grants
    (whose storage account's key the customer never has)."""
    from datetime import UTC, datetime, timedelta

    from azure.storage.blob import AccountSasPermissions, BlobSasPermissions, ResourceTypes, generate_account_sas

    url = grant(two_accounts, "own", DEVSTORE_ACCOUNT)
    parts = urlsplit(url)
    _, account, container, blob = parts.path.split("/")
    expiry = datetime.now(UTC) + timedelta(hours=1)
    tokens = [generate_blob_sas(account, container, blob, account_key=DEVSTORE_KEY, expiry=expiry,
                                permission=BlobSasPermissions(read=True, write=True)),
              generate_account_sas(account, DEVSTORE_KEY, ResourceTypes(object=True),
                                   AccountSasPermissions(read=True, write=True), expiry=expiry)]
    for token in tokens:
        other = BlobClient.from_blob_url(f"{parts.scheme}://{parts.netloc}{parts.path}?{token}")
        with pytest.raises(HttpResponseError) as e:
            other.get_blob_properties()
        assert e.value.status_code == 403
    assert BlobClient.from_blob_url(url).get_blob_properties().size == (1 << 30) + 512
