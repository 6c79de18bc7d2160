"""TLS for the NBD data plane: the server's x509 settings, its SSL context, the client's identity.

The settings follow qemu-nbd and nbdkit: a mode (``off``, ``on`` = offered, ``require`` =
forced, see :mod:`owm.nbd.protocol`), the server's certificate and key (PEM), an optional CA
bundle the client certificates must chain to, and whether a client certificate is required.
With a CA but without ``verify_peer`` a client certificate is asked for and, when one is sent,
checked and used as the client's identity; a client without one stays anonymous.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owm.common.errors import InvalidRequest
from owm.nbd.protocol import TLS_MODES, TLS_OFF


@dataclass(frozen=True)
class TlsSettings:
    """What ``owm serve --tls ...`` was told."""

    mode: str = TLS_OFF
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    verify_peer: bool = False

    def check(self) -> None:
        """Raise InvalidRequest (one sentence) if the settings do not fit together."""
        if self.mode not in TLS_MODES:
            raise InvalidRequest(f"The TLS mode must be one of {', '.join(TLS_MODES)}.")
        if self.mode == TLS_OFF:
            return
        if self.cert is None or self.key is None:
            raise InvalidRequest(f"--tls={self.mode} needs --tls-cert and --tls-key.")
        if self.verify_peer and self.ca is None:
            raise InvalidRequest("--tls-verify-peer needs --tls-ca to check client certificates.")


def _readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InvalidRequest(f"Cannot read the TLS {what} {path}: {exc.strerror}.") from None


def server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """The SSL context the server upgrades connections with; None when TLS is off.

    Every file is read now, so that a wrong path or a key that does not match the certificate
    stops ``owm serve`` at start-up with one sentence instead of failing each client later.
    """
    settings.check()
    if settings.mode == TLS_OFF:
        return None
    assert settings.cert is not None and settings.key is not None
    _readable(settings.cert, "certificate")
    _readable(settings.key, "key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # The protocol document: TLS 1.2 at least, nothing older by default.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.cert, settings.key)
    except ssl.SSLError as exc:
        raise InvalidRequest(
            f"The TLS certificate {settings.cert} and key {settings.key} cannot be used "
            f"together ({exc.reason or exc})."
        ) from None
    if settings.ca is not None:
        _readable(settings.ca, "CA bundle")
        try:
            context.load_verify_locations(cafile=str(settings.ca))
        except ssl.SSLError as exc:
            raise InvalidRequest(
                f"The TLS CA bundle {settings.ca} cannot be used ({exc.reason or exc})."
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED if settings.verify_peer else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def peer_identity(ssl_object: Any) -> str | None:
    """The subject common name of the client's verified certificate, or None without one."""
    if ssl_object is None:
        return None
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, ssl.SSLError):
        return None
    if not cert:
        return None  # no certificate, or one that was not verified
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str):
                return value
    return None
