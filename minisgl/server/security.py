"""TLS files and API keys, shared by `minisgl serve` and `minisgl gateway`.

Everything here is checked before anything listens: a missing or unreadable file, a file that
is not PEM, a key that does not match its certificate, or a malformed API key is a ValueError
naming the flag (one line, exit code 2). Key values never appear in a message or a log.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

AUTH_HEADER = "authorization"
"""The metadata key (gRPC) or header (HTTP) that carries `Bearer <key>`, as OpenAI clients send."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM contents of a certificate chain and its private key, and optionally a CA bundle
    (the server's: clients must present a certificate it signed; a client's: the CA that
    signed the server's certificate)."""

    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    ca: bytes | None = None


def _read(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def load_tls(
    cert: str | None,
    key: str | None,
    ca: str | None,
    flags: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--tls-client-ca"),
    need_cert_for_ca: bool = True,
) -> TlsFiles | None:
    """Read and check the files named by the TLS flags; None when none is given.

    `flags` are the flags' names for the messages. The certificate and key must come
    together and match (checked with the ssl module); the CA must parse as certificates.
    With `need_cert_for_ca` (a server), a CA without a certificate is refused.
    """
    cert_flag, key_flag, ca_flag = flags
    if cert is None and key is None and ca is None:
        return None
    if (cert is None) != (key is None):
        given, missing = (cert_flag, key_flag) if key is None else (key_flag, cert_flag)
        raise ValueError(f"{given}: needs {missing} as well")
    if ca is not None and cert is None and need_cert_for_ca:
        raise ValueError(f"{ca_flag}: needs {cert_flag} and {key_flag} (mTLS is on top of TLS)")
    files = TlsFiles(
        cert=None if cert is None else _read(cert, cert_flag),
        key=None if key is None else _read(key, key_flag),
        ca=None if ca is None else _read(ca, ca_flag),
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            raise ValueError(
                f"{cert_flag} {cert} / {key_flag} {key}: not a certificate and its matching "
                f"private key ({e.reason or e})"
            ) from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as e:
            raise ValueError(f"{ca_flag} {ca}: not PEM certificates ({e.reason or e})") from None
    return files


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """An HTTPS server context (the gateway's) for files that load_tls has checked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def _check_key(key: str, where: str) -> str:
    if not key:
        raise ValueError(f"{where}: an API key must not be empty")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise ValueError(f"{where}: an API key must be printable ASCII without spaces")
    return key


def read_api_keys(
    keys: Sequence[str] | None,
    files: Sequence[str] | None,
    key_flag: str = "--api-key",
    file_flag: str = "--api-key-file",
) -> tuple[str, ...]:
    """The keys given on the command line and in key files (one per line; blank lines and
    lines starting with # are ignored). A key file that holds no key is an error."""
    found = [_check_key(k, key_flag) for k in keys or ()]
    for path in files or ():
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ValueError(f"{file_flag} {path}: cannot read it ({why or e})") from None
        before = len(found)
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                found.append(_check_key(text, f"{file_flag} {path} line {number}"))
        if len(found) == before:
            raise ValueError(f"{file_flag} {path}: holds no key")
    return tuple(dict.fromkeys(found))


def bearer(value: str | None) -> str | None:
    """The key in an `authorization: Bearer <key>` value (the scheme in any case), or None."""
    if value is None:
        return None
    scheme, _, key = value.strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


class KeyCheck:
    """Compares a presented key with every configured key in constant time (hmac)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:
        return f"KeyCheck({len(self._keys)} keys)"

    def problem(self, header: str | None) -> str | None:
        """None if `header` (the authorization value) carries a configured key, else what is
        wrong with it, for the error message and the log (never the key itself)."""
        given = bearer(header)
        if given is None:
            return (
                "missing API key (send 'authorization: Bearer <key>')"
                if header is None
                else "malformed authorization (expected 'Bearer <key>')"
            )
        presented = given.encode("utf-8", "replace")
        ok = False
        for key in self._keys:  # every key, so that the time does not say which one matched
            ok |= hmac.compare_digest(presented, key)
        return None if ok else "invalid API key"
