"""TLS in transit: the HTTP endpoint with a (self-signed) certificate, and PostgreSQL's sslmode."""

from __future__ import annotations

import datetime as dt
import ipaddress
import threading
from pathlib import Path

import httpx
import psycopg
import pytest

from app.client import KaizenClient, wait_until_ready
from app.config import KaizenConfig
from tests.conftest import free_port


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (its own CA), and the key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kaizen-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_the_api_over_https_with_a_self_signed_certificate(tmp_path: Path) -> None:
    import uvicorn

    from app.serve.api import CollectorService, create_api

    cert, key = self_signed(tmp_path)
    port = free_port()
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(tmp_path / "k.db")},
            "serve": {"port": port, "tls_certfile": str(cert), "tls_keyfile": str(key), "tls_ca_file": str(cert)},
        }
    )
    url = cfg.api_url()
    assert url == f"https://127.0.0.1:{port}"
    # The options Serve's proxy is started with (actors/stack.py) are uvicorn's, which it runs.
    options = cfg.http_options()
    assert options["ssl_certfile"] == str(cert) and options["ssl_keyfile"] == str(key)
    service = CollectorService(cfg)
    server = uvicorn.Server(
        uvicorn.Config(create_api(service), log_level="warning", **{k: v for k, v in options.items()})
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until_ready(url, timeout_s=20, verify=cfg.tls_verify())
        with KaizenClient.from_config(url, cfg) as client:
            client.record_interaction(
                session_id="s", prompt="over TLS", response="```python\nprint(1)\n```", id="tls-1"
            )
            assert client.flush(timeout=20)
        assert httpx.get(f"{url}/v1/interactions/tls-1", verify=cfg.tls_verify()).json()["input_raw"] == "over TLS"
        with pytest.raises(httpx.ConnectError):  # the system's CAs do not know a self-signed certificate
            httpx.get(f"{url}/healthz")
        with pytest.raises(httpx.HTTPError):  # and plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.store.close()


def test_postgres_sslmode_is_applied(pg_dsn: str) -> None:
    from app.store import open_store

    def store(mode: str):
        return open_store(
            KaizenConfig.model_validate(
                {"store": {"engine": "postgres", "postgres_dsn": pg_dsn, "postgres_sslmode": mode}}
            ).store
        )

    plain = store("disable")
    assert plain.ping()
    plain.close()
    # The test server speaks no TLS: a store that requires it refuses to connect rather than fall back.
    with psycopg.connect(pg_dsn) as conn:
        ssl_on = conn.execute("SHOW ssl").fetchone()[0] == "on"
    if ssl_on:
        secured = store("require")
        assert secured.ping()
        secured.close()
    else:
        with pytest.raises(Exception, match="(?i)ssl"):
            store("require")
