"""Nodes of a cluster for the tests and the failover benchmark: real daemons sharing one
volume's cipher dir (as shared storage would) and the first node's keyset."""

from __future__ import annotations

import shutil
import time

from tests.daemon import PASSWORD, Daemon

VOLUME = "photos"


def form(nodes: list[Daemon]) -> None:
    first = nodes[0].start()
    first.setup_and_unlock()
    first.call("POST", "/volumes", {"id": VOLUME})
    for d in nodes[1:]:
        (d.state / "crypto").mkdir(parents=True, mode=0o700)
        shutil.copy2(first.state / "crypto" / "keyset.json", d.state / "crypto")
        (d.state / "ciphertext").mkdir(mode=0o700)
        (d.state / "ciphertext" / VOLUME).symlink_to(first.state / "ciphertext" / VOLUME)
        d.start()
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        d.call("POST", "/volumes", {"id": VOLUME})
    for d in nodes:  # a grant promotes; until then, read-only
        d.call("POST", f"/volumes/{VOLUME}/attach", {"role": "follower"})


def leaders(nodes: list[Daemon]) -> list[Daemon]:
    out = []
    for d in nodes:
        if d.proc is None:
            continue
        v = d.volume(VOLUME)
        if v["attached"] and v["read_only"] is False:
            out.append(d)
    return out


def wait_leader(nodes: list[Daemon], exclude: Daemon | None = None,
                 timeout: float = 30.0) -> tuple[Daemon, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [d for d in nodes if d is not exclude and d.proc is not None]
        found = leaders(live)
        if len(found) == 1:
            return found[0], time.monotonic()
        time.sleep(0.05)
    raise AssertionError("no single leader emerged: "
                         + "; ".join(n.log()[-1500:] for n in nodes))
