"""Takeover times of a three-node cluster: three etcd members and three daemons on this
machine (loopback), one volume on shared storage.

    python -m benchmarks.failover                  # TTL 5 s, 5 trials per scenario
    python -m benchmarks.failover --ttl 2 --trials 3

Scenarios: the leader's daemon killed (kill -9), frozen (SIGSTOP), and etcd losing quorum
(two members stopped: how long until the leader stops being one; then, members back, how
long until a new leader). A takeover is timed from the event (at a random moment of
the leader's term) to the moment exactly one other node's mount is writable. Prints a
Markdown table of medians and ranges.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path

from tests.cluster import VOLUME, form, leaders, wait_leader
from tests.daemon import PASSWORD, Daemon
from tests.etcd import EtcdCluster


def _revive(d: Daemon) -> None:
    d.start()
    d.call("POST", "/crypto/unlock", {"password": PASSWORD})
    d.call("POST", f"/volumes/{VOLUME}/attach", {"role": "follower"})


def run(ttl: float, trials: int, base: Path, seed: int = 1) -> dict[str, list[float]]:
    rng = random.Random(seed)
    times: dict[str, list[float]] = {"daemon kill -9": [], "daemon SIGSTOP": [],
                                     "quorum loss: step-down": [],
                                     "quorum back: new leader": []}
    with EtcdCluster(base / "etcd", members=3) as etcd:
        nodes = []
        for name in ("a", "b", "c"):
            (base / name).mkdir()
            nodes.append(Daemon(base / name, ["--node-id", name, "--etcd",
                                              ",".join(etcd.endpoints), "--lease-ttl",
                                              str(ttl)]))
        try:
            form(nodes)
            for _ in range(trials):
                leader, _ = wait_leader(nodes)
                time.sleep(rng.uniform(ttl, 2 * ttl))  # a failure at any moment of a term
                t0 = time.monotonic()
                leader.kill9()
                _, t1 = wait_leader(nodes, exclude=leader)
                times["daemon kill -9"].append(t1 - t0)
                leader.stop(release=False)
                _revive(leader)

                leader, _ = wait_leader(nodes)
                time.sleep(rng.uniform(ttl, 2 * ttl))
                assert leader.proc is not None
                pid = leader.proc.pid
                t0 = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
                _, t1 = wait_leader(nodes, exclude=leader)
                times["daemon SIGSTOP"].append(t1 - t0)
                os.kill(pid, signal.SIGCONT)
                leader.wait_for(lambda d=leader: d.volume(VOLUME)["read_only"] is True)

            for _ in range(max(1, trials // 2)):
                leader, _ = wait_leader(nodes)
                t0 = time.monotonic()
                etcd.stop_member(1)
                etcd.stop_member(2)
                leader.wait_for(lambda d=leader: not leaders([d]), timeout=4 * ttl)
                times["quorum loss: step-down"].append(time.monotonic() - t0)
                t0 = time.monotonic()
                etcd.start_member(1)
                etcd.start_member(2)
                _, t1 = wait_leader(nodes)
                times["quorum back: new leader"].append(t1 - t0)
        finally:
            for d in nodes:
                if d.proc is not None:
                    os.kill(d.proc.pid, signal.SIGCONT)
                d.stop()
    return times


def table(times: dict[str, list[float]], ttl: float) -> str:
    rows = [f"| scenario (TTL {ttl:g} s) | trials | median | min | max |",
            "|---|---|---|---|---|"]
    for name, xs in times.items():
        if xs:
            rows.append(f"| {name} | {len(xs)} | {statistics.median(xs):.2f} s | "
                        f"{min(xs):.2f} s | {max(xs):.2f} s |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.failover",
                                description=__doc__.splitlines()[0])
    p.add_argument("--ttl", type=float, default=5.0)
    p.add_argument("--trials", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="piccolo-failover-") as tmp:
        times = run(args.ttl, args.trials, Path(tmp))
    print(table(times, args.ttl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
