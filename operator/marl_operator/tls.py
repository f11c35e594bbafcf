"""The HTTP API over TLS, with a certificate that is renewed under the running process.

A Service's certificate lives weeks, not years: cert-manager renews it well before it expires,
and the kubelet swaps the files of the mounted Secret at once (a symlink flip). A server that
read them once would serve the old certificate until its clients refused it, so
:class:`ServingCertificate` re-reads them every ``check_every_s`` and, when their bytes changed,
builds a new context from them. Only a pair that loads (a private key that matches its
certificate) replaces the one in use: a rotation caught half-written is tried again at the next
check, never served, and the previous certificate is served meanwhile.

The listening socket keeps the context it was made with. Each handshake is moved to the newest
one in the server-name callback, which OpenSSL calls for every ClientHello, with a server name
or without one (a kubelet probing the pod's IP sends none).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from pathlib import Path

log = logging.getLogger(__name__)

CHECK_EVERY_S = 30.0
"""How often the files are compared with those served: a kubelet refreshes a mounted Secret
within about a minute of its change, and cert-manager renews a third of a lifetime early."""


class CertificateError(ValueError):
    """A certificate and key that cannot be served: the message names the files and why."""


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context serving ``cert_file`` (the certificate, then any intermediates)
    with ``key_file``."""
    for path in (cert_file, key_file):  # ssl's own error does not say which file is missing
        _read(path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # what uvicorn speaks
    try:
        # An empty password: OpenSSL would otherwise ask for an encrypted key's passphrase on
        # the terminal, blocking the event loop; this way such a key is refused.
        context.load_cert_chain(cert_file, key_file, password=b"")
    except ssl.SSLError as error:
        reason = error.reason or str(error)
        raise CertificateError(
            f"{cert_file} and {key_file} are not a PEM certificate and its unencrypted private "
            f"key ({reason}): a kubernetes.io/tls Secret's tls.crt and tls.key are"
        ) from None
    except OSError as error:  # a file gone since it was read
        raise CertificateError(f"cannot read {cert_file} or {key_file}: {error}") from None
    return context


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CertificateError(f"cannot read {path}: {error.strerror}") from None


class ServingCertificate:
    """The certificate the API serves, reloaded from its files when they change.

    ``context`` is the one to listen with; it is built from the files at once, so a pair that
    cannot be served fails here (:class:`CertificateError`), before anything starts.
    """

    def __init__(
        self, cert_file: str | Path, key_file: str | Path, check_every_s: float = CHECK_EVERY_S
    ) -> None:
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self.check_every_s = check_every_s
        self._served = self._fingerprint()
        self._refused: str | None = None
        self._current = server_context(self.cert_file, self.key_file)
        self.context = self._current
        self.context.sni_callback = self._newest

    def _newest(self, connection: ssl.SSLObject, _name: str | None, context: ssl.SSLContext):
        if context is not self._current:
            connection.context = self._current

    def _fingerprint(self) -> str:
        data = _read(self.cert_file) + b"\0" + _read(self.key_file)
        return hashlib.sha256(data).hexdigest()

    def reload_if_changed(self) -> bool:
        """Serve the files' certificate from the next handshake on if they changed and load;
        True if it now does. A pair that does not load is logged once and tried again."""
        try:
            fingerprint = self._fingerprint()
            if fingerprint == self._served:  # as served (again, after a refused pair)
                self._refused = None
                return False
            context = server_context(self.cert_file, self.key_file)
        except CertificateError as error:
            if str(error) != self._refused:
                self._refused = str(error)
                log.warning(
                    "the HTTP API keeps serving its previous certificate",
                    extra={"fields": {"reason": str(error)}},
                )
            return False
        # Files swapped between the fingerprint and the load leave the newer pair served and
        # the older fingerprint kept: the next check loads the same pair again, harmlessly.
        self._current, self._served, self._refused = context, fingerprint, None
        log.info(
            "the HTTP API serves a renewed certificate",
            extra={"fields": {"file": str(self.cert_file)}},
        )
        return True

    @property
    def refused(self) -> str | None:
        """Why the files' pair is not served, while they hold one that cannot be (the
        previous certificate is served meanwhile); None while the files' pair is served."""
        return self._refused

    async def watch(self) -> None:
        """Check the files every ``check_every_s`` until cancelled; an unforeseen error is
        logged and the checks go on, so that a renewal is never missed for good."""
        while True:
            await asyncio.sleep(self.check_every_s)
            try:
                self.reload_if_changed()
            except Exception:
                log.exception("the HTTP API's certificate could not be checked for renewal")
