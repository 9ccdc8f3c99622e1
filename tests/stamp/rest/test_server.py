"""`stamp serve` as a command: TLS, accounts from the stamp folder and the
command line, usage errors, a clean stop."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import subprocess
import sys

from azure.storage.blob import BlobServiceClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stamp import Stamp
from stamp.rest import DEVSTORE_KEY

from .conftest import start_server, stop_server


def _self_signed(folder) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_and_accounts(tmp_path):
    path = str(tmp_path / "st")
    Stamp.create(path).close()
    key_a = base64.b64encode(os.urandom(64)).decode()
    key_b = base64.b64encode(os.urandom(64)).decode()
    with open(os.path.join(path, "accounts.json"), "w") as f:
        json.dump({"filed": key_a}, f)
    cert, key = _self_signed(str(tmp_path))
    srv = start_server(path, "--cert", cert, "--key", key, "--account", f"flagged:{key_b}")
    try:
        assert srv.url.startswith("https://127.0.0.1:")
        for account, secret in (("filed", key_a), ("flagged", key_b),
                                ("devstoreaccount1", DEVSTORE_KEY)):
            cs = (f"DefaultEndpointsProtocol=https;AccountName={account};AccountKey={secret};"
                  f"BlobEndpoint={srv.url}/{account};")
            svc = BlobServiceClient.from_connection_string(cs, connection_verify=cert)
            c = svc.create_container(f"tls-{account}")
            c.get_blob_client("b").create_page_blob(4096)
            assert [b.name for b in c.list_blobs()] == ["b"]
        wrong = (f"DefaultEndpointsProtocol=https;AccountName=filed;AccountKey={key_b};"
                 f"BlobEndpoint={srv.url}/filed;")
        try:
            BlobServiceClient.from_connection_string(wrong, connection_verify=cert).create_container("nope")
            raise AssertionError("a wrong key was accepted")
        except Exception as e:
            assert getattr(e, "error_code", None) == "AuthenticationFailed"
    finally:
        assert "Traceback" not in stop_server(srv)


def test_usage_errors(tmp_path):
    path = str(tmp_path / "st")
    Stamp.create(path).close()
    for args, code in ((["--max-inflight-mib", "1"], 2), (["--account", "nokey"], 1),
                       (["--account", "x:not base64!"], 1), (["--cert", "/nonexistent"], 1)):
        proc = subprocess.run([sys.executable, "-m", "stamp", "--stamp", path, "serve", "--port", "0", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "stamp", "serve", "--help"], capture_output=True, text=True)
    assert "UseDevelopmentStorage=true" in proc.stdout and "--max-inflight-mib" in proc.stdout
