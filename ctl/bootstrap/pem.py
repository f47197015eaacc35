"""PEM text as the pre-unlock assets take it: an unencrypted private key, a certificate
chain. One place for the rule, used by the API's validation and by the assets alike."""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

MAX_PEM = 64 * 1024


def _data(text: str) -> bytes | str:
    data = text.encode()
    if not text.strip() or len(data) > MAX_PEM or b"-----BEGIN " not in data:
        return f"must be PEM text of at most {MAX_PEM} bytes"
    return data if data.endswith(b"\n") else data + b"\n"


def load_private_key(text: str) -> tuple[bytes, PrivateKeyTypes] | str:
    """(the bytes to store, the key), or why not."""
    data = _data(text)
    if isinstance(data, str):
        return data
    try:
        return data, serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnicodeError) as exc:
        return f"not an unencrypted PEM private key ({exc})"


def load_certificate_chain(text: str) -> tuple[bytes, list[x509.Certificate]] | str:
    data = _data(text)
    if isinstance(data, str):
        return data
    try:
        return data, x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        return f"not a PEM certificate chain ({exc})"


def private_key_violation(text: str) -> str | None:
    got = load_private_key(text)
    return got if isinstance(got, str) else None


def certificate_chain_violation(text: str) -> str | None:
    got = load_certificate_chain(text)
    return got if isinstance(got, str) else None


def public_der(key_or_cert: Any) -> bytes:
    return bytes(key_or_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
