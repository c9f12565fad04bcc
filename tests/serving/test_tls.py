"""TLS on the front end is one setting away: server certificate, and mutual TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tiergate._core import ConfigError
from tiergate.client import Client
from tiergate.policy import default_policy
from tiergate.server import Tls, build_server


def _pair(path: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = _pair(d, "ca", None, ca=True)
    _pair(d, "server", ca)
    _pair(d, "client", ca)
    _pair(d, "rogue-ca", None, ca=True)
    return d


@pytest.fixture
def serve_tls(linear_bundle: Path) -> Iterator[object]:
    stops: list[object] = []

    def _serve(tls: Tls) -> str:
        server = build_server(default_policy(linear_bundle))
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        port = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1:0", tls), loop).result(30)
        stops.append((server, loop))
        return f"127.0.0.1:{port}"

    yield _serve
    for server, loop in stops:  # type: ignore[misc]
        asyncio.run_coroutine_threadsafe(server.stop(0.2), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


def _code(client: Client) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        client.classify("hello", timeout=5)
    return e.value.code()  # type: ignore[no-any-return]


def test_tls_server(pki: Path, serve_tls: object) -> None:
    address = serve_tls(Tls(pki / "server.pem", pki / "server.key"))  # type: ignore[operator]
    with Client(address, tls_ca=pki / "ca.pem") as c:
        assert c.classify("hello there", timeout=10).label
    with Client(address) as c:  # plaintext against a TLS port
        assert _code(c) == grpc.StatusCode.UNAVAILABLE
    with Client(address, tls_ca=pki / "rogue-ca.pem") as c:  # a server we cannot trust
        assert _code(c) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate(pki: Path, serve_tls: object) -> None:
    tls = Tls(pki / "server.pem", pki / "server.key", client_ca=pki / "ca.pem")
    address = serve_tls(tls)  # type: ignore[operator]
    with Client(address, tls_ca=pki / "ca.pem") as c:
        assert _code(c) == grpc.StatusCode.UNAVAILABLE
    with Client(address, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                tls_key=pki / "client.key") as c:  # fmt: skip
        assert c.classify("hello there", timeout=10).label


def test_a_client_certificate_needs_its_key(pki: Path) -> None:
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        Client("127.0.0.1:1", tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem")


def test_broken_tls_files_are_named(pki: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"TLS certificate .*junk\.pem: not a PEM file"):
        Tls(tmp_path / "junk.pem", pki / "server.key").credentials()
    with pytest.raises(ConfigError, match=r"TLS key .*missing\.key"):
        Tls(pki / "server.pem", tmp_path / "missing.key").credentials()


def test_serve_command_checks_tls_flags(linear_bundle: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tiergate", "serve", "--runtime", "local", "--bundle",
         str(linear_bundle), "--tls-cert", str(tmp_path / "x.pem")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "--tls-cert and --tls-key together" in run.stderr
