"""SAS tokens: those azure-storage-blob makes verify, and every way one can
be wrong is refused with the service's code. Ours round-trip too."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

import pytest
from azure.storage.blob import (
    AccountSasPermissions,
    BlobSasPermissions,
    ContainerSasPermissions,
    ResourceTypes,
    generate_account_sas,
    generate_blob_sas,
    generate_container_sas,
)

from stamp import sas
from stamp.sas import AccessPolicy, SasError

ACCOUNT = "devstoreaccount1"
KEY_B64 = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
KEY = base64.b64decode(KEY_B64)
NOW = datetime(2026, 11, 21, 22, 42, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
SNAP = "2026-11-21T22:42:00.5945160Z"


def q(token: str) -> dict[str, str]:
    return dict(parse_qsl(token, keep_blank_values=True))


def check(token: str, *, permission: str = "r", container: str | None = "vhds", blob: str | None = "disk 1.vhd",
          snapshot: str | None = None, client_ip: str = "127.0.0.1", https: bool = False,
          now: datetime = NOW, **kw: object) -> sas.Sas:
    return sas.verify(q(token), account=ACCOUNT, key=KEY, permission=permission, container=container, blob=blob,
                      snapshot=snapshot, client_ip=client_ip, https=https, now=now, **kw)  # type: ignore[arg-type]


def refused(token: str, code: str, **kw: object) -> SasError:
    with pytest.raises(SasError) as e:
        check(token, **kw)  # type: ignore[arg-type]
    assert e.value.code == code and e.value.status == 403
    return e.value


def sdk_blob(**kw: object) -> str:
    args: dict[str, object] = {"permission": BlobSasPermissions(read=True), "expiry": NOW + HOUR}
    args.update(kw)
    return generate_blob_sas(ACCOUNT, "vhds", "disk 1.vhd", account_key=KEY_B64, **args)  # type: ignore[arg-type]


def test_reference_worked_examples() -> None:
    # the snapshot SAS and the account SAS of the protocol reference, byte for byte
    token = sas.generate_blob_sas(ACCOUNT, KEY, "vhds", "disk 1.vhd", permission="r",
                                  expiry="2026-11-21T23:42:00Z", snapshot=SNAP)
    assert q(token)["sig"] == "/1+SNKVz2tEBT4v6fb+7hFRkpCOjsnvTTQ7ju/O8kHQ="
    token = sas.generate_account_sas(ACCOUNT, KEY, resource_types="co", permission="rl",
                                     expiry="2026-11-21T23:42:01Z")
    assert q(token)["sig"] == "sI13APTz4oTzs2rUSjq43wuFOQTODgPqQ9rVvkjxBHE="


def test_sdk_blob_sas_verifies() -> None:
    token = sdk_blob(start=NOW - HOUR)
    got = check(token)
    assert got.kind == "service" and got.resource == "b" and got.permission == "r"
    assert got.expiry == NOW + HOUR and got.start == NOW - HOUR
    refused(token, "AuthenticationFailed", blob="disk 2.vhd")


def test_sdk_snapshot_sas_opens_that_snapshot_only() -> None:
    token = sdk_blob(snapshot=SNAP)
    assert q(token)["sr"] == "bs"
    assert check(token, snapshot=SNAP).resource == "bs"
    refused(token, "AuthenticationFailed", snapshot=None)
    refused(token, "AuthenticationFailed", snapshot="2026-11-21T22:42:01.0000000Z")


def test_blob_sas_opens_the_blob_s_snapshots_too() -> None:
    assert check(sdk_blob(), snapshot=SNAP).resource == "b"


def test_sdk_container_sas() -> None:
    token = generate_container_sas(ACCOUNT, "vhds", account_key=KEY_B64, expiry=NOW + HOUR,
                                   permission=ContainerSasPermissions(read=True, list=True))
    assert check(token, permission="l", blob=None).resource == "c"
    assert check(token, permission="r", blob="any/blob").resource == "c"
    refused(token, "AuthenticationFailed", container="other", blob=None, permission="l")
    refused(token, "AuthorizationPermissionMismatch", permission="w")


def test_sdk_account_sas() -> None:
    token = generate_account_sas(ACCOUNT, KEY_B64, ResourceTypes(container=True, object=True),
                                 AccountSasPermissions(read=True, list=True), NOW + HOUR)
    assert check(token).kind == "account"
    assert check(token, blob=None, permission="l").resource == "co"
    refused(token, "AuthorizationResourceTypeMismatch", container=None, blob=None, permission="l")
    refused(token, "AuthorizationPermissionMismatch", permission="cw")
    other = generate_account_sas(ACCOUNT, KEY_B64, ResourceTypes(object=True), AccountSasPermissions(read=True),
                                 NOW + HOUR, services="q")
    refused(other, "AuthorizationServiceMismatch")


def test_ours_verify_with_the_same_checks() -> None:
    token = sas.generate_blob_sas(ACCOUNT, KEY, "vhds", "disk 1.vhd", permission="rw", expiry=NOW + HOUR,
                                  start=NOW - HOUR, ip="10.0.0.1-10.0.0.9", protocol="https")
    assert check(token, permission="w", client_ip="10.0.0.5", https=True).permission == "rw"
    token = sas.generate_container_sas(ACCOUNT, KEY, "vhds", permission="rl", expiry=NOW + HOUR)
    assert check(token, blob=None, permission="l").resource == "c"


def test_tampered_signature_quotes_the_string_to_sign() -> None:
    token = sdk_blob()
    fields = q(token)
    for field, value in (("sp", "rw"), ("se", "2030-01-01T00:00:00Z"), ("sig", "A" + fields["sig"][1:])):
        err = refused("&".join(f"{k}={v if k != field else value}" for k, v in fields.items())
                      .replace("+", "%2B"), "AuthenticationFailed")
        assert err.detail.startswith("Signature did not match. String to sign used was ")
    err = refused(token, "AuthenticationFailed", blob="disk 2.vhd")
    assert err.detail.endswith(sas.service_string_to_sign(q(token), "/blob/devstoreaccount1/vhds/disk 2.vhd", ""))


def test_wrong_key_is_refused() -> None:
    token = generate_blob_sas(ACCOUNT, "vhds", "disk 1.vhd", account_key=base64.b64encode(b"x" * 64).decode(),
                              permission="r", expiry=NOW + HOUR)
    refused(token, "AuthenticationFailed")


def test_time_window() -> None:
    token = sdk_blob(start=NOW, expiry=NOW + HOUR)
    assert check(token, now=NOW + HOUR)  # the last second of the window
    err = refused(token, "AuthenticationFailed", now=NOW + HOUR + timedelta(seconds=1))
    assert err.detail == ("Signature not valid in the specified time frame: Start [Sat, 21 Nov 2026 22:42:00 GMT] "
                          "- Expiry [Sat, 21 Nov 2026 23:42:00 GMT] - Current [Sat, 21 Nov 2026 23:42:01 GMT]")
    refused(token, "AuthenticationFailed", now=NOW - timedelta(seconds=1))
    backwards = sdk_blob(start=NOW + HOUR, expiry=NOW)
    assert "must be after signed start time" in refused(backwards, "AuthenticationFailed").detail


def test_source_ip() -> None:
    token = sdk_blob(ip="168.1.5.60-168.1.5.70")
    assert check(token, client_ip="168.1.5.60") and check(token, client_ip="::ffff:168.1.5.70")
    err = refused(token, "AuthorizationSourceIPMismatch", client_ip="168.1.5.71")
    assert "source IP 168.1.5.71" in err.message
    refused(token, "AuthorizationSourceIPMismatch", client_ip="::1")
    one = sdk_blob(ip="127.0.0.1")
    assert check(one)
    refused(one, "AuthorizationSourceIPMismatch", client_ip="127.0.0.2")
    assert "sip" in refused(sdk_blob(ip="1.2.3"), "AuthenticationFailed").detail


def test_protocol() -> None:
    token = sdk_blob(protocol="https")
    assert check(token, https=True)
    refused(token, "AuthorizationProtocolMismatch", https=False)
    assert check(sdk_blob(protocol="https,http"), https=False)


def test_permissions() -> None:
    token = sdk_blob(permission=BlobSasPermissions(read=True, write=True))
    assert check(token, permission="w") and check(token, permission="cw")
    refused(token, "AuthorizationPermissionMismatch", permission="d")
    refused(token, "AuthorizationPermissionMismatch", permission="c")
    assert "in this order" in refused(sdk_blob(permission="wr"), "AuthenticationFailed").detail
    assert "unknown letters q" in refused(sdk_blob(permission="rq"), "AuthenticationFailed").detail
    assert "once each" in refused(sdk_blob(permission="rr"), "AuthenticationFailed").detail
    every = BlobSasPermissions(read=True, add=True, create=True, write=True, delete=True,
                               delete_previous_version=True, permanent_delete=True, tag=True, move=True,
                               execute=True, set_immutability_policy=True)
    assert check(sdk_blob(permission=every), permission="i")


def test_mandatory_fields_and_resource_types() -> None:
    fields = q(sdk_blob())
    no_sr = "&".join(f"{k}={v}" for k, v in fields.items() if k != "sr").replace("+", "%2B")
    assert refused(no_sr, "AuthenticationFailed").detail == "sr is mandatory. Cannot be empty"
    no_sv = "&".join(f"{k}={v}" for k, v in fields.items() if k != "sv").replace("+", "%2B")
    assert refused(no_sv, "AuthenticationFailed").detail == "sv is mandatory. Cannot be empty"
    refused(sdk_blob(), "AuthorizationResourceTypeMismatch", blob=None)
    old = sas.generate_blob_sas(ACCOUNT, KEY, "vhds", "disk 1.vhd", permission="r", expiry=NOW, version="2012-02-12")
    assert "not supported" in refused(old, "AuthenticationFailed", now=NOW).detail
    refused(sas.generate_blob_sas(ACCOUNT, KEY, "vhds", "disk 1.vhd", permission="r", expiry=None),
            "AuthenticationFailed")


def test_unencoded_plus_in_the_signature_still_verifies() -> None:
    token = sdk_blob(snapshot=SNAP)  # its signature holds a '+', sent as %2B
    raw = token.replace("%2B", "+")
    fields = dict(parse_qsl(raw))  # as a form decoder reads it: '+' becomes ' '
    assert " " in fields["sig"]
    sas.verify(fields, account=ACCOUNT, key=KEY, permission="r", container="vhds", blob="disk 1.vhd",
               snapshot=SNAP, client_ip="127.0.0.1", https=False, now=NOW)


def test_stored_access_policy() -> None:
    policies = {"pol": AccessPolicy(expiry="2026-11-21T23:42:00Z", permission="r")}
    token = sdk_blob(permission=None, expiry=None, policy_id="pol")
    assert check(token, policies=policies).permission == "r"
    refused(token, "AuthenticationFailed", policies={})
    refused(token, "AuthenticationFailed", now=NOW + 2 * HOUR, policies=policies)
    both = sdk_blob(policy_id="pol")  # sp and se given twice
    refused(both, "AuthenticationFailed", policies=policies)


def test_malformed_times_are_authentication_failures() -> None:
    for bad in ("tomorrow", "2026-13-01T00:00:00Z", "2026-11-21T23:42:00"):
        token = sas.generate_blob_sas(ACCOUNT, KEY, "vhds", "disk 1.vhd", permission="r", expiry=bad)
        assert "se is not a valid" in refused(token, "AuthenticationFailed").detail
    assert sas.parse_time("2026-11-21", "se") == datetime(2026, 11, 21, tzinfo=UTC)
    assert sas.parse_time("2026-11-21T10:00Z", "se") == datetime(2026, 11, 21, 10, tzinfo=UTC)
    assert sas.parse_time("2026-11-21T10:00:01.1234567Z", "se").microsecond == 123456


# The SDK signs only its own version's layout; older layouts, as the service documents them, by hand.
OLD_LAYOUTS = {
    "2020-02-10": "r\n\n2026-11-21T23:42:00Z\n/blob/devstoreaccount1/vhds/disk 1.vhd\n\n\n\n2020-02-10\nbs\n"
                  + SNAP + "\n\n\n\n\n",
    "2017-04-17": "r\n\n2026-11-21T23:42:00Z\n/blob/devstoreaccount1/vhds/disk 1.vhd\n\n\n\n2017-04-17\n\n\n\n\n",
    "2014-02-14": "r\n\n2026-11-21T23:42:00Z\n/devstoreaccount1/vhds/disk 1.vhd\n\n2014-02-14\n\n\n\n\n",
}


@pytest.mark.parametrize("version", sorted(OLD_LAYOUTS))
def test_older_signed_versions(version: str) -> None:
    sig = sas.sign(KEY, OLD_LAYOUTS[version])
    fields = {"sv": version, "sr": "bs" if version >= "2018-11-09" else "b", "sp": "r",
              "se": "2026-11-21T23:42:00Z", "sig": sig}
    snapshot = SNAP if version >= "2018-11-09" else None
    sas.verify(fields, account=ACCOUNT, key=KEY, permission="r", container="vhds", blob="disk 1.vhd",
               snapshot=snapshot, client_ip="127.0.0.1", https=False, now=NOW)
    ours = sas.generate_blob_sas(ACCOUNT, KEY, "vhds", "disk 1.vhd", permission="r", expiry="2026-11-21T23:42:00Z",
                                 snapshot=snapshot, version=version)
    assert q(ours)["sig"] == sig
