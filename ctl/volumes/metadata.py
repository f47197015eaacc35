"""`ciphertext/<id>/piccolo.volume.json`: the volume passphrase sealed under the SDEK.

The format is the original daemon's: `version` 1, `wrapped_key` and `nonce` in padded
standard base64, AES-256-GCM with a 12-byte nonce and no associated data. The passphrase is
32 random bytes written as unpadded base64 (43 characters): the password gocryptfs (or
piccolofs) unlocks the tree with. We add `class`, `cluster_mode` and `follower_policy`,
which readers of the original format ignore.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CLASSES = ("bootstrap", "control", "application")
CLUSTER_MODES = ("stateful", "stateless_read_only")
FOLLOWER_POLICIES = ("read_only", "detached")


class MetadataCorrupted(Exception):
    """piccolo.volume.json cannot be parsed or its key does not open under the SDEK."""


def new_passphrase() -> bytes:
    return base64.b64encode(os.urandom(32)).rstrip(b"=")


@dataclass(frozen=True)
class VolumeMeta:
    wrapped_key: bytes
    nonce: bytes
    volume_class: str = "application"
    cluster_mode: str = "stateful"
    follower_policy: str = "read_only"

    @classmethod
    def seal(cls, sdek: bytes, passphrase: bytes, volume_class: str, cluster_mode: str,
             follower_policy: str) -> VolumeMeta:
        nonce = os.urandom(12)
        return cls(AESGCM(sdek).encrypt(nonce, passphrase, None), nonce, volume_class,
                   cluster_mode, follower_policy)

    def unseal(self, sdek: bytes) -> bytearray:
        try:
            raw = AESGCM(sdek).decrypt(self.nonce, self.wrapped_key, None)
        except InvalidTag:
            raise MetadataCorrupted("volume key does not open under the SDEK") from None
        if len(raw) == 32 and not _is_b64_text(raw):
            raw = base64.b64encode(raw).rstrip(b"=")  # raw-key variant: use its text form
        return bytearray(raw)

    def to_json(self) -> bytes:
        obj = {
            "version": 1,
            "wrapped_key": base64.b64encode(self.wrapped_key).decode(),
            "nonce": base64.b64encode(self.nonce).decode(),
            "class": self.volume_class,
            "cluster_mode": self.cluster_mode,
            "follower_policy": self.follower_policy,
        }
        return (json.dumps(obj, indent=2) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> VolumeMeta:
        try:
            obj: Any = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MetadataCorrupted("volume metadata is not valid JSON") from None
        if not isinstance(obj, dict):
            raise MetadataCorrupted("volume metadata is not an object")

        def field(name: str) -> bytes:
            v = obj.get(name)
            if not isinstance(v, str) or not v:
                raise MetadataCorrupted(f"volume metadata lacks {name}")
            try:
                return base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raise MetadataCorrupted(f"volume metadata {name} is not base64") from None

        meta = cls(field("wrapped_key"), field("nonce"),
                   str(obj.get("class") or "application"),
                   str(obj.get("cluster_mode") or "stateful"),
                   str(obj.get("follower_policy") or "read_only"))
        if len(meta.nonce) != 12:
            raise MetadataCorrupted("volume metadata nonce must be 12 bytes")
        return meta


def _is_b64_text(raw: bytes) -> bool:
    try:
        base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        return False
    return True
