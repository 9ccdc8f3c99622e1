"""A host reaching its stamp by https:// (`stamp serve --cert --key`), with a
self-signed certificate made here: trusted through `hostcache init --ca-file`
(kept in the host folder for every later command), refused with a one-line
error when not trusted or not for the URL's name, and connections kept alive
per thread as over http."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hostcache.host import Host
from hostcache.throttle import FakeClock
from stamp import Stamp
from stamp.disks import Disks
from stamp.remote import RemoteStamp, Unreachable, Untrusted
from tests.hostcache.test_host import make_image
from tests.stamp.rest.conftest import start_server, stop_server

MIB = 1 << 20


def make_certificate(folder, name: str, dns: list[str], ips: list[str]) -> tuple[str, str]:
    """A self-signed certificate for these names (its own CA), and its key: PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    alt = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(folder, f"{name}.pem"), os.path.join(folder, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls(tmp_path):
    """A stamp served over https with a certificate for 127.0.0.1 (and a name that is not localhost)."""
    stamp = Stamp.create(str(tmp_path / "st"))
    d = Disks(stamp)
    d.create_image("mbr", path=make_image(tmp_path / "mbr.vhd"))
    d.create_empty("data1", 128, "Premium_LRS")
    stamp.close()
    cert, key = make_certificate(str(tmp_path), "stamp", ["stamp.example"], ["127.0.0.1"])
    server = start_server(str(tmp_path / "st"), "--cert", cert, "--key", key)
    assert server.url.startswith("https://")
    yield server, cert
    err = stop_server(server)
    assert "Traceback" not in err, err


def _cli(host: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hostcache", "--host", host, *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DISKSTAMP_REMOTE_RETRY_SECONDS": "20"})


def test_a_host_over_https_attaches_writes_and_reads_back_through_its_ca(tmp_path, tls):
    server, cert = tls
    url = f"{server.url}/devstoreaccount1"
    h = str(tmp_path / "h")
    out = _cli(h, "init", "--stamp", url, "--ca-file", cert)
    assert out.returncode == 0, out.stderr
    os.unlink(cert)  # the host keeps its own copy: later commands trust the same CA
    for args in (("vm", "create", "vm1", "--size", "D8s_v3", "--image", "mbr"),
                 ("vm", "attach", "vm1", "data1", "--lun", "0", "--caching", "ReadWrite")):
        out = _cli(h, *args)
        assert out.returncode == 0, out.stderr
    data = os.urandom(5 * MIB + 512)  # more than one 4 MiB Put Page
    with Host(h, clock=FakeClock()) as host:
        disk = host.open_disk("vm1", 0)
        disk.write(512, data)
        disk.flush()
        assert disk.read(512, len(data)) == data
        host.detach("vm1", 0)  # writes back what the cache held dirty, over https
        host.attach("vm1", "data1", 0, "None")
        assert host.open_disk("vm1", 0).read(512, len(data)) == data  # read from the stamp itself
    with Stamp.open(server.stamp) as st, Disks(st).open_virtual("data1") as v:
        assert v.read(512, len(data)) == data


def test_an_untrusted_certificate_or_another_name_is_a_one_line_error(tmp_path, tls):
    server, cert = tls
    port = server.url.rsplit(":", 1)[1]
    url = f"{server.url}/devstoreaccount1"
    out = _cli(str(tmp_path / "a"), "init", "--stamp", url)  # the system's CAs do not know it
    assert out.returncode == 1 and "does not trust" in out.stderr and "--ca-file" in out.stderr, out.stderr
    other, _ = make_certificate(str(tmp_path), "other", ["localhost"], ["127.0.0.1"])
    out = _cli(str(tmp_path / "a"), "init", "--stamp", url, "--ca-file", other)  # another CA
    assert out.returncode == 1 and "does not trust" in out.stderr, out.stderr
    out = _cli(str(tmp_path / "a"), "init", "--stamp", f"https://localhost:{port}/devstoreaccount1",
               "--ca-file", cert)  # the same server by a name its certificate does not hold
    assert out.returncode == 1 and "is not for localhost" in out.stderr, out.stderr
    out = _cli(str(tmp_path / "a"), "init", "--stamp", f"http://127.0.0.1:{port}/devstoreaccount1",
               "--ca-file", cert)
    assert out.returncode == 1 and "for an https:// stamp" in out.stderr, out.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    out = _cli(str(tmp_path / "a"), "init", "--stamp", url, "--ca-file", str(garbage))
    assert out.returncode == 1 and "no PEM certificate" in out.stderr, out.stderr
    assert not os.path.exists(tmp_path / "a")
    with pytest.raises(Untrusted, match="does not trust"):
        RemoteStamp(url, retry_seconds=20)  # never retried: at once, not after 20 s of retries
    with pytest.raises(Unreachable, match="is the URL https://"):  # plain http to it: a hint
        RemoteStamp(url.replace("https://", "http://"), retry_seconds=1)


def test_https_to_a_plain_http_server_says_it_does_not_speak_tls(tmp_path):
    Stamp.create(str(tmp_path / "st")).close()
    server = start_server(str(tmp_path / "st"))
    try:
        cert, _ = make_certificate(str(tmp_path), "stamp", ["localhost"], ["127.0.0.1"])
        https = server.url.replace("http://", "https://") + "/devstoreaccount1"
        with pytest.raises(Untrusted, match="does not speak TLS"):
            RemoteStamp(https, retry_seconds=20, ca_file=cert)
    finally:
        stop_server(server)


def test_connections_over_tls_are_kept_alive_per_thread(tls):
    server, cert = tls
    with RemoteStamp(f"{server.url}/devstoreaccount1", ca_file=cert) as remote:
        blob = remote.records().record("data1")["blob"]
        first = remote.endpoint.connects
        for _ in range(40):
            remote.blobs.read(blob, 0, 4096)
        assert remote.endpoint.connects == first  # 40 requests, no new handshake

        def reads() -> None:
            for _ in range(20):
                remote.blobs.read(blob, 0, 4096)
        threads = [threading.Thread(target=reads) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert remote.endpoint.connects == first + 3  # one each
