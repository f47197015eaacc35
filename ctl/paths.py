"""Every path of the daemon, from one place.

No other module spells a default location; a test greps the tree to keep it that way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = "/var/lib/piccolod"
DEFAULT_RUN_DIR = "/run/piccolo"
BOOTSTRAP = "bootstrap"
CONTROL = "control"


@dataclass(frozen=True)
class Paths:
    state: Path
    run: Path

    @classmethod
    def resolve(cls, state_dir: str | None = None, run_dir: str | None = None) -> Paths:
        state = state_dir or os.environ.get("PICCOLO_STATE_DIR") or DEFAULT_STATE_DIR
        run = run_dir or os.environ.get("PICCOLO_RUN_DIR") or DEFAULT_RUN_DIR
        return cls(Path(state).resolve(), Path(run).resolve())

    # -- keys ----------------------------------------------------------------------------
    @property
    def crypto_dir(self) -> Path:
        return self.state / "crypto"

    @property
    def keyset(self) -> Path:
        return self.crypto_dir / "keyset.json"

    # -- volumes -------------------------------------------------------------------------
    @property
    def ciphertext_dir(self) -> Path:
        return self.state / "ciphertext"

    def cipher(self, volume_id: str) -> Path:
        return self.ciphertext_dir / volume_id

    def volume_meta(self, volume_id: str) -> Path:
        return self.cipher(volume_id) / "piccolo.volume.json"

    @property
    def journal_dir(self) -> Path:
        return self.state / "volumes"

    def journal(self, volume_id: str) -> Path:
        return self.journal_dir / volume_id / "state.json"

    @property
    def mounts_dir(self) -> Path:
        return self.state / "mounts"

    def mount(self, volume_id: str) -> Path:
        return self.mounts_dir / volume_id

    @property
    def control_db(self) -> Path:
        return self.mount(CONTROL) / "control.db"

    @property
    def exports_dir(self) -> Path:
        return self.state / "exports"

    # -- storage pools (ctl.devices) -----------------------------------------------------
    @property
    def devices_dir(self) -> Path:
        return self.state / "devices"

    @property
    def pools_file(self) -> Path:
        """The pools this device has seen: listed (as absent) while their disk is away."""
        return self.devices_dir / "pools.json"

    @property
    def pools_dir(self) -> Path:
        return self.run / "pools"

    def pool_mount(self, pool_id: str) -> Path:
        return self.pools_dir / pool_id

    def pool_cipher(self, pool_id: str, volume_id: str) -> Path:
        """A volume's cipher dir on a pool; its journal stays under `journal_dir`."""
        return self.pool_mount(pool_id) / "ciphertext" / volume_id

    # -- runtime -------------------------------------------------------------------------
    @property
    def socket(self) -> Path:
        return self.run / "ctl.sock"

    def ensure(self) -> None:
        """Create the tree with private modes (0700); existing dirs keep their modes."""
        for d in (self.state, self.crypto_dir, self.ciphertext_dir, self.journal_dir,
                  self.mounts_dir, self.exports_dir, self.devices_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.run.mkdir(mode=0o750, parents=True, exist_ok=True)
