"""Boot before the password: the bootstrap volume mounted from a TPM-sealed key (a real
software TPM, started per test on loopback) and the pre-unlock assets on it, against the
real daemon through its socket and its CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certs import key_and_cert
from tests.daemon import PASSWORD, Daemon
from tests.mounts import is_mounted
from tests.swtpm import Swtpm

pytestmark = pytest.mark.timeout(300)

REMOTE = {"endpoint": "https://relay.example", "portal_hostname": "portal.home.example",
          "enabled": True, "dns_credentials": {"token": "marker-7f3a9c-secret"}}


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[Swtpm]:
    with Swtpm(tmp_path / "tpm") as t:
        yield t


def _daemon(tmp_path: Path, tcti: str) -> Daemon:
    return Daemon(tmp_path, ["--tpm-tcti", tcti])


def _restart(d: Daemon) -> None:
    d.stop(release=False)
    d.start()


def _unseal_failures(d: Daemon) -> list[dict[str, Any]]:
    return [e["data"] for e in d.events(topic="tpm_unseal_failed")]


def _ctl_json(d: Daemon, *args: str, input: str | None = None) -> Any:
    res = d.ctl("--json", *args, input=input)
    assert res.returncode == 0, res.stderr + res.stdout
    return json.loads(res.stdout)


def test_bootstrap_mounts_before_the_password(tmp_path: Path, tpm: Swtpm) -> None:
    d = _daemon(tmp_path, tpm.tcti).start()
    try:
        d.setup_and_unlock()
        key, cert = key_and_cert()
        d.call("PUT", "/bootstrap/remote", REMOTE)
        d.call("PUT", "/bootstrap/acme", {"key": key, "account": {"uri": "acct/1"}})
        d.call("PUT", "/bootstrap/certs/portal", {"cert": cert, "key": key})
        status = _ctl_json(d, "tpm", "enroll")
        assert status["enrolled"] and status["pcrs"] == [7] and not status["pin"]
        sealed = d.state / "crypto" / "bootstrap.tpm.json"
        assert sealed.stat().st_mode & 0o777 == 0o600
        _restart(d)
        s = d.call("GET", "/crypto/status")
        assert s["locked"] and s["bootstrap"] == "tpm"
        assert is_mounted(d.mount("bootstrap")) and not is_mounted(d.mount("control"))
        assert "mounted from the TPM" in d.ctl("status").stdout
        # The assets work while locked.
        assert _ctl_json(d, "bootstrap", "remote", "show")["portal_hostname"] == \
            REMOTE["portal_hostname"]
        assert _ctl_json(d, "bootstrap", "acme", "show")["account"] == {"uri": "acct/1"}
        shown = _ctl_json(d, "bootstrap", "certs", "show", "portal")
        assert shown["cert"] == cert and shown["key"] == key
        assert "CN=portal.home.example" in shown["subject"]
        assert d.error("GET", "/store/remote").status == 423  # the store stays locked
        # Nothing of the assets rests outside the encrypted bootstrap volume.
        for path in d.state.rglob("*"):
            if path.is_file() and not path.is_relative_to(d.mount("bootstrap")):
                assert b"marker-7f3a9c" not in path.read_bytes(), path
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        assert d.call("GET", "/crypto/status")["bootstrap"] == "tpm"
    finally:
        d.stop()


def test_changed_pcrs_fall_back_to_unlock_and_reseal(tmp_path: Path, tpm: Swtpm) -> None:
    d = _daemon(tmp_path, tpm.tcti).start()
    try:
        d.setup_and_unlock()
        d.call("POST", "/tpm/enroll", {})
        d.stop(release=False)
        tpm.extend_pcr(7, b"a new Secure Boot db")  # a firmware update, say
        d.start()
        assert not is_mounted(d.mount("bootstrap"))
        assert d.call("GET", "/crypto/status")["bootstrap"] is None
        assert [f["kind"] for f in _unseal_failures(d)] == ["policy_mismatch"]
        assert d.call("GET", "/tpm")["pcrs_changed"] is True
        assert d.error("GET", "/bootstrap/remote").status == 423
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})  # today's behaviour
        assert is_mounted(d.mount("bootstrap"))
        d.wait_for(lambda: d.events(topic="tpm_resealed"), what="the reseal")
        d.wait_for(lambda: any(r["kind"] == "tpm.reseal"
                               for r in d.call("GET", "/store/audit")["audit"]),
                   what="the reseal's audit row")
        assert d.call("GET", "/tpm")["pcrs_changed"] is False
        _restart(d)
        assert d.call("GET", "/crypto/status")["bootstrap"] == "tpm"
    finally:
        d.stop()


def test_a_sealed_key_from_another_tpm_is_refused(tmp_path: Path, tpm: Swtpm) -> None:
    d = _daemon(tmp_path, tpm.tcti).start()
    other = Swtpm(tmp_path / "other-tpm")
    try:
        d.setup_and_unlock()
        d.call("POST", "/tpm/enroll", {})
        d.stop(release=False)
        other.start()
        d.extra = ["--tpm-tcti", other.tcti]
        d.start()
        assert not is_mounted(d.mount("bootstrap"))
        assert [f["kind"] for f in _unseal_failures(d)] == ["wrong_tpm"]
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        assert is_mounted(d.mount("bootstrap"))
        # The password proved, the key is sealed to this TPM: the next boot needs none.
        d.wait_for(lambda: d.events(topic="tpm_resealed"), what="the reseal to this TPM")
        _restart(d)
        assert d.call("GET", "/crypto/status")["bootstrap"] == "tpm"
    finally:
        d.stop()
        other.stop()


def test_without_a_tpm_nothing_changes(tmp_path: Path, tpm: Swtpm) -> None:
    tcti = tpm.tcti
    tpm.stop()  # nothing answers there any more
    d = _daemon(tmp_path, tcti).start()
    try:
        status = d.call("GET", "/tpm")
        assert not status["available"] and not status["enrolled"]
        d.setup_and_unlock()
        err = d.error("POST", "/tpm/enroll", {})
        assert err.status == 409, err.body
        assert not (d.state / "crypto" / "bootstrap.tpm.json").exists()
        _restart(d)
        assert not is_mounted(d.mount("bootstrap")) and not _unseal_failures(d)
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        assert d.call("GET", "/crypto/status")["bootstrap"] == "unlock"
    finally:
        d.stop()


def test_a_corrupt_sealed_file_is_reported_and_unlock_still_works(tmp_path: Path,
                                                                   tpm: Swtpm) -> None:
    d = _daemon(tmp_path, tpm.tcti).start()
    try:
        d.setup_and_unlock()
        d.call("POST", "/tpm/enroll", {})
        d.stop(release=False)
        sealed = d.state / "crypto" / "bootstrap.tpm.json"
        sealed.write_text(sealed.read_text()[:60])
        d.start()
        failures = _unseal_failures(d)
        assert [f["kind"] for f in failures] == ["corrupt"]
        assert "bootstrap.tpm.json" in failures[0]["reason"]
        status = d.call("GET", "/tpm")
        assert status["enrolled"] and "bootstrap.tpm.json" in status["error"]
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        assert is_mounted(d.mount("bootstrap"))
        d.call("POST", "/tpm/enroll", {})  # enrolling again replaces it
        assert "error" not in d.call("GET", "/tpm")
    finally:
        d.stop()


def test_a_pin_enrolment_mounts_only_with_its_pin(tmp_path: Path, tpm: Swtpm) -> None:
    d = _daemon(tmp_path, tpm.tcti).start()
    try:
        d.setup_and_unlock()
        status = _ctl_json(d, "tpm", "enroll", "--pin", input="2468-1357\n")
        assert status["pin"] is True
        _restart(d)
        assert not is_mounted(d.mount("bootstrap"))
        assert [f["kind"] for f in _unseal_failures(d)] == ["pin_required"]
        err = d.error("POST", "/tpm/unseal", {"pin": "0000-0000"})
        assert err.status == 401
        res = d.ctl("tpm", "unseal", input="2468-1357\n")
        assert res.returncode == 0, res.stderr
        assert is_mounted(d.mount("bootstrap")) and not is_mounted(d.mount("control"))
        assert d.call("GET", "/crypto/status")["bootstrap"] == "tpm"
    finally:
        d.stop()


def test_remote_config_mirror_rules(tmp_path: Path, tpm: Swtpm) -> None:
    d = _daemon(tmp_path, tpm.tcti).start()
    try:
        assert d.error("GET", "/bootstrap/remote").status == 423  # nothing mounted
        d.setup_and_unlock()
        assert d.call("GET", "/bootstrap/remote") == {}
        res = d.call("PUT", "/bootstrap/remote", REMOTE)
        assert res["stored"] is True  # the store first
        assert d.call("GET", "/store/remote")["endpoint"] == REMOTE["endpoint"]
        config = d.mount("bootstrap") / "remote" / "config.json"
        assert config.stat().st_mode & 0o777 == 0o600
        # A corrupt file is replaced from the store.
        config.write_text("{not json")
        assert d.call("GET", "/bootstrap/remote")["endpoint"] == REMOTE["endpoint"]
        assert json.loads(config.read_text())["endpoint"] == REMOTE["endpoint"]
        # Saved while locked (bootstrap from the TPM): reaches the store at unlock.
        d.call("POST", "/tpm/enroll", {})
        _restart(d)
        changed = {**REMOTE, "endpoint": "https://other-relay.example"}
        assert d.call("PUT", "/bootstrap/remote", changed)["stored"] is False
        assert d.call("GET", "/bootstrap/remote")["endpoint"] == changed["endpoint"]
        d.call("POST", "/crypto/unlock", {"password": PASSWORD})
        d.wait_for(lambda: d.call("GET", "/store/remote")["endpoint"] == changed["endpoint"],
                   what="the store to take the configuration saved while locked")
        # Bad input changes nothing.
        bad = d.error("PUT", "/bootstrap/remote", {"enabled": "yes"})
        assert bad.status == 422
        _, cert = key_and_cert()
        other_key, _ = key_and_cert()
        err = d.error("PUT", "/bootstrap/certs/portal", {"cert": cert, "key": other_key})
        assert err.status == 422 and "belong" in str(err)
        assert d.error("GET", "/bootstrap/certs/portal").status == 404
        assert d.error("PUT", "/bootstrap/acme", {"key": "not pem", "account": {}}).status \
            == 422
    finally:
        d.stop()


def test_tpm_routes_refuse_while_locked(tmp_path: Path, tpm: Swtpm) -> None:
    d = _daemon(tmp_path, tpm.tcti).start()
    try:
        d.call("POST", "/crypto/setup", {"password": PASSWORD})
        for route in ("/tpm/enroll", "/tpm/reseal", "/tpm/remove"):
            assert d.error("POST", route, {}).status == 423, route
        assert d.ctl("tpm", "enroll").returncode == 3  # the CLI's exit code for "locked"
    finally:
        d.stop()
