"""The HTTP API over HTTPS: the certificate is checked before anything starts, served to
clients that trust its CA, and renewed under the running server (a Secret's files swapped, as
the kubelet does for cert-manager), where a pair caught half-written is never served."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path

import httpx
import pytest
import trustme
from marl_operator.__main__ import parse_args
from marl_operator.api import ApiServer, create_app
from marl_operator.instruments import Instruments
from marl_operator.store import ReportStore
from marl_operator.tls import CertificateError, ServingCertificate, server_context

PROMETHEUS = ["--prometheus-url", "http://prometheus:9090"]


def write_pair(ca: trustme.CA, folder: Path) -> tuple[Path, Path]:
    """A certificate for loopback signed by ``ca``, as tls.crt and tls.key in ``folder``,
    each replaced by a rename (so a reader sees the old file or the new, never a mix)."""
    issued = ca.issue_cert("localhost", "127.0.0.1")
    folder.mkdir(parents=True, exist_ok=True)
    for name, pem in (("tls.crt", issued.cert_chain_pems), ("tls.key", [issued.private_key_pem])):
        staged = folder / f".{name}"
        staged.write_bytes(b"".join(blob.bytes() for blob in pem))
        os.replace(staged, folder / name)
    return folder / "tls.crt", folder / "tls.key"


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def served_by(port: int, ca: trustme.CA) -> bool:
    """Whether a new connection to the API verifies against ``ca`` and gets its probe."""
    try:
        async with httpx.AsyncClient(verify=trusting(ca)) as http:
            response = await http.get(f"https://127.0.0.1:{port}/healthz")
    except httpx.ConnectError as error:
        if "CERTIFICATE_VERIFY_FAILED" in str(error):
            return False
        raise
    return response.status_code == 200


@pytest.fixture
def app():
    return create_app(ReportStore(), Instruments(), ready=lambda: True)


def test_a_key_that_is_not_the_certificates_is_refused_naming_both_files(tmp_path) -> None:
    cert, _ = write_pair(trustme.CA(), tmp_path / "a")
    _, other_key = write_pair(trustme.CA(), tmp_path / "b")
    with pytest.raises(CertificateError) as refused:
        server_context(cert, other_key)
    assert str(cert) in str(refused.value) and str(other_key) in str(refused.value)
    with pytest.raises(CertificateError, match=r"cannot read .*missing\.key"):
        server_context(cert, tmp_path / "missing.key")


def test_an_encrypted_key_is_refused_without_asking_for_its_passphrase(tmp_path) -> None:
    """OpenSSL asks a terminal for an encrypted key's passphrase: on the event loop, that
    froze the operator (and the certificate watch died of the error it raised)."""
    from cryptography.hazmat.primitives import serialization

    cert, key = write_pair(trustme.CA(), tmp_path)
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CertificateError, match="unencrypted private key"):
        server_context(cert, key)


def test_the_command_line_checks_the_pair_before_anything_starts(tmp_path, capsys) -> None:
    cert, key = write_pair(trustme.CA(), tmp_path / "a")
    _, other_key = write_pair(trustme.CA(), tmp_path / "b")
    assert parse_args(PROMETHEUS).api_tls is None
    assert isinstance(
        parse_args([*PROMETHEUS, "--api-tls-cert", str(cert), "--api-tls-key", str(key)]).api_tls,
        ServingCertificate,
    )
    for argv, named in (
        (["--api-tls-cert", str(cert)], "give both, or neither"),
        (["--api-tls-key", str(key)], "give both, or neither"),
        (["--api-tls-cert", str(cert), "--api-tls-key", str(other_key)], str(other_key)),
    ):
        with pytest.raises(SystemExit):
            parse_args([*PROMETHEUS, *argv])
        error = capsys.readouterr().err
        assert "--api-tls-cert" in error and named in error, error


def test_https_is_served_to_clients_that_trust_the_ca_and_plain_http_gets_nothing(
    tmp_path, app
) -> None:
    ca = trustme.CA()
    tls = ServingCertificate(*write_pair(ca, tmp_path))

    async def main() -> None:
        server = ApiServer(app, "127.0.0.1", 0, tls=tls)
        await server.start()
        try:
            assert await served_by(server.port, ca)
            assert not await served_by(server.port, trustme.CA())
            async with httpx.AsyncClient() as http:
                with pytest.raises(httpx.HTTPError):
                    await http.get(f"http://127.0.0.1:{server.port}/healthz")
            assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_renewed_certificate_is_served_from_the_next_handshake(tmp_path, app, caplog) -> None:
    """The kubelet swaps a mounted Secret's files; a rotation whose key lags its certificate
    is logged once and not served (every handshake would fail), then served once whole."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    tls = ServingCertificate(*write_pair(old_ca, tmp_path / "live"))
    metrics = Instruments()
    metrics.track_certificate(lambda: tls.refused is not None)

    async def main() -> None:
        server = ApiServer(app, "127.0.0.1", 0, tls=tls)
        await server.start()
        try:
            assert not tls.reload_if_changed()  # nothing changed
            renewed_cert, renewed_key = write_pair(new_ca, tmp_path / "renewed")
            os.replace(renewed_cert, tls.cert_file)  # the certificate first, the key later
            with caplog.at_level(logging.WARNING, logger="marl_operator.tls"):
                assert not tls.reload_if_changed()
                assert not tls.reload_if_changed()
            refusals = [r for r in caplog.records if "previous certificate" in r.getMessage()]
            assert len(refusals) == 1, refusals
            assert await served_by(server.port, old_ca)
            assert tls.refused and str(tls.key_file) in tls.refused
            assert "api_certificate_refused 1.0" in metrics.exposition()[0].decode()

            os.replace(renewed_key, tls.key_file)
            assert tls.reload_if_changed()
            assert await served_by(server.port, new_ca)
            assert not await served_by(server.port, old_ca)
            assert tls.refused is None
            assert "api_certificate_refused 0.0" in metrics.exposition()[0].decode()
        finally:
            await server.stop()

    asyncio.run(main())


def test_the_server_rereads_the_files_by_itself_through_errors_and_stops_with_it(
    tmp_path, app, monkeypatch
) -> None:
    """An unforeseen error in one check must not end the checks: the renewal after it would
    never be served, and the pod would stay Ready until its certificate expired."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    tls = ServingCertificate(*write_pair(old_ca, tmp_path), check_every_s=0.02)
    reload_if_changed, failures = tls.reload_if_changed, []

    def failing_once() -> bool:
        if not failures:
            failures.append(True)
            raise RuntimeError("an unforeseen error")
        return reload_if_changed()

    monkeypatch.setattr(tls, "reload_if_changed", failing_once)

    def watching() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if "certificate" in t.get_name() and not t.done()]

    async def main() -> None:
        server = ApiServer(app, "127.0.0.1", 0, tls=tls)
        await server.start()
        try:
            assert watching()
            async with asyncio.timeout(5):
                while not failures:
                    await asyncio.sleep(0.02)
            write_pair(new_ca, tmp_path)
            async with asyncio.timeout(10):
                while not await served_by(server.port, new_ca):
                    await asyncio.sleep(0.05)
        finally:
            await server.stop()
        await asyncio.sleep(0)
        assert not watching()

    asyncio.run(main())
