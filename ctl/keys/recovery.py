"""Recovery keys a person can read out and type back.

New keys are 24 random words from the 26 NATO spelling words (112.8 bits, drawn without
modulo bias) followed by 2 checksum words, so a mistyped or swapped word is reported as a
typo before any costly key derivation. Keys made by the original daemon — 24 words, no
checksum — are still accepted. Input is case-insensitive and whitespace-tolerant.
"""

from __future__ import annotations

import hashlib
import secrets

WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)
DATA_WORDS = 24
CHECK_WORDS = 2
_INDEX = {w: i for i, w in enumerate(WORDS)}


class RecoveryKeyError(ValueError):
    """The text is not a recovery key (unknown word, wrong count, checksum mismatch)."""


def _checksum(data: list[str]) -> list[str]:
    digest = hashlib.sha256(" ".join(data).encode()).digest()
    n = int.from_bytes(digest[:4], "big") % (len(WORDS) ** CHECK_WORDS)
    return [WORDS[n // len(WORDS)], WORDS[n % len(WORDS)]]


def generate() -> str:
    data = [WORDS[secrets.randbelow(len(WORDS))] for _ in range(DATA_WORDS)]
    return " ".join(data + _checksum(data))


def normalize(text: str) -> str:
    """The canonical form that is fed to the KDF; raises RecoveryKeyError on a typo."""
    words = text.lower().split()
    unknown = [w for w in words if w not in _INDEX]
    if unknown:
        raise RecoveryKeyError(f"unknown word(s) in recovery key: {', '.join(unknown[:3])}")
    if len(words) == DATA_WORDS:
        return " ".join(words)  # a key made by the original daemon: no checksum to verify
    if len(words) != DATA_WORDS + CHECK_WORDS:
        raise RecoveryKeyError(
            f"a recovery key has {DATA_WORDS + CHECK_WORDS} words (or {DATA_WORDS} for older "
            f"keys), got {len(words)}")
    if _checksum(words[:DATA_WORDS]) != words[DATA_WORDS:]:
        raise RecoveryKeyError("recovery key checksum does not match: a word is mistyped")
    return " ".join(words)
