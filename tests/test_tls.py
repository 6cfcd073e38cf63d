"""Encrypted migration (harness/vm/tls.py): credentials made per run, how QEMU is wired to them,
the breakages the fault table uses, TLS as a matrix axis and a CLI option, and a real PSK
migration. The four refused handshakes run on real QEMU from the fault table
(tests/test_scenarios.py), across hosts in tests/test_two_hosts.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core.errors import UsageError
from harness.matrix.files import expand_matrix, parse_matrix
from harness.scenario.engine import RunContext
from harness.scenario.faults import FAULTS
from harness.scenario.spec import Variant
from harness.scenario.suite import SCENARIOS
from harness.vm import tls
from harness.vm.migration import MigrationMode, telling_line

from .test_matrix import host

needs_certtool = pytest.mark.skipif(shutil.which("certtool") is None,
                                    reason="certtool (Debian package gnutls-bin) is not installed")
REPO = Path(__file__).resolve().parent.parent


def certtool_text(cert: Path) -> str:
    return subprocess.run(["certtool", "-i", "--infile", str(cert)], capture_output=True,
                          text=True, check=True, timeout=30).stdout


@needs_certtool
def test_x509_credentials_are_made_private_in_qemus_layout(tmp_path: Path):
    c = tls.make("x509", tmp_path / "tls", "10.77.0.2")
    assert {p.name for p in c.server_dir.iterdir()} == {"ca-cert.pem", "server-cert.pem",
                                                         "server-key.pem"}
    assert {p.name for p in c.client_dir.iterdir()} == {"ca-cert.pem", "client-cert.pem",
                                                         "client-key.pem"}
    for d in (c.root, c.server_dir, c.client_dir):
        assert (d.stat().st_mode & 0o777) == 0o700
    for key in (c.server_dir / "server-key.pem", c.client_dir / "client-key.pem"):
        assert (key.stat().st_mode & 0o777) == 0o600
    server = certtool_text(c.server_dir / "server-cert.pem")
    assert "DNSname: dst.nestvirt.test" in server and "IPAddress: 10.77.0.2" in server
    assert "TLS WWW Server" in server
    client = certtool_text(c.client_dir / "client-cert.pem")
    assert "CN=src.nestvirt.test" in client and "TLS WWW Client" in client
    # QEMU matches gnutls' DN order, the reverse of what certtool prints.
    assert c.authz_identity == "O=nestvirt,CN=src.nestvirt.test"


@needs_certtool
def test_qemu_is_given_json_objects_and_a_fresh_client_id_each_time(tmp_path: Path):
    c = tls.make("x509", tmp_path / "tls", "127.0.0.1")
    args = c.dst_args("/remote/tls")
    assert args[0::2] == ["-object", "-object"]
    creds, authz = (json.loads(a) for a in args[1::2])
    assert creds == {"qom-type": "tls-creds-x509", "id": "nvtls-dst", "endpoint": "server",
                     "dir": "/remote/tls", "verify-peer": True}
    # The dotted rules.0.match form is refused by QEMU 7.2: the JSON form is the one that works.
    assert authz["qom-type"] == "authz-list" and authz["policy"] == "deny"
    assert authz["rules"] == [{"match": "O=nestvirt,CN=src.nestvirt.test", "policy": "allow",
                               "format": "exact"}]
    assert c.dst_params() == {"tls-creds": "nvtls-dst", "tls-authz": "nvtls-authz"}
    first, second = c.src_object(), c.src_object()
    assert first["id"] != second["id"] and first["verify-peer"] is True
    assert c.src_params(first["id"]) == {"tls-creds": first["id"],
                                         "tls-hostname": "dst.nestvirt.test"}


@needs_certtool
def test_each_breakage_changes_exactly_what_it_says(tmp_path: Path):
    c = tls.make("x509", tmp_path / "tls", "127.0.0.1")
    before = {p: p.read_bytes() for p in (*c.server_dir.iterdir(), *c.client_dir.iterdir())}
    c.use_other_ca()
    assert "CN=nestvirt other CA" in certtool_text(c.server_dir / "server-cert.pem")
    assert (c.client_dir / "client-cert.pem").read_bytes() == before[c.client_dir / "client-cert.pem"]
    c.use_rogue_client()
    assert "CN=rogue.nestvirt.test" in certtool_text(c.client_dir / "client-cert.pem")
    c.expect_other_hostname()
    assert c.src_params("x")["tls-hostname"] == "wrong.nestvirt.test"
    assert len(c.changed) == 3 and c.describe()["changed_on_purpose"] == c.changed


def test_psk_is_one_shared_line_and_a_mismatch_is_another_key(tmp_path: Path):
    c = tls.make("psk", tmp_path / "tls", "127.0.0.1")
    line = (c.server_dir / "keys.psk").read_text()
    user, _, key = line.strip().partition(":")
    assert user == "qemu" and len(key) == 64 and int(key, 16) >= 0
    assert (c.client_dir / "keys.psk").read_text() == line
    assert ((c.server_dir / "keys.psk").stat().st_mode & 0o777) == 0o600
    assert json.loads(c.dst_args()[1])["qom-type"] == "tls-creds-psk"
    assert c.dst_params() == {"tls-creds": "nvtls-dst"}
    assert c.src_object()["username"] == "qemu"
    c.use_other_psk()
    assert (c.client_dir / "keys.psk").read_text() != line
    # What a result records: names and kinds, never a key.
    assert key not in json.dumps(c.describe())


def test_the_destinations_line_is_picked_and_unprefixed():
    lines = ["qemu-system-x86_64: Cannot read from TLS channel: Input/output error",
             "qemu-system-x86_64: Not a migration stream"]
    assert telling_line(lines) == "Cannot read from TLS channel: Input/output error"
    assert telling_line(["qemu-system-x86_64: load of migration failed: x"]) == \
        "load of migration failed: x"
    assert telling_line([]) is None


def test_tls_is_a_mode_field_gated_on_the_schema():
    with pytest.raises(UsageError, match="unknown TLS mode 'tls13'"):
        MigrationMode(tls="tls13")
    facts = host("tcg-debian12")
    assert MigrationMode(tls="x509").unsupported_reason(facts.qemu) is None
    old = type(facts.qemu)(**{**facts.qemu.__dict__, "migration_parameters": frozenset(
        p for p in facts.qemu.migration_parameters if p != "tls-authz")})
    assert "lack 'tls-authz'" in MigrationMode(tls="x509").unsupported_reason(old)
    assert MigrationMode(tls="psk").unsupported_reason(old) is None
    v = Variant(SCENARIOS["migrate-plain"], MigrationMode(tls="psk"))
    assert v.id == "migrate-plain/none+tls=psk"
    assert Variant.from_json(v.to_json()) == v


def test_tls_is_a_matrix_axis_and_tls_faults_are_pruned_without_their_mode():
    plan = expand_matrix(parse_matrix({
        "nestvirt_matrix": 1, "name": "t", "include": [
            {"scenario": "migrate-plain", "compression": ["none", "multifd-zstd"],
             "tls": ["none", "x509"]},
            {"scenario": "migrate-plain", "tls": ["x509", "psk"], "inject": "tls-psk-mismatch"}]},
        "t.yaml"), host("tcg-debian12"))
    assert [p.id for p in plan.variants] == [
        "migrate-plain/none", "migrate-plain/none+tls=x509", "migrate-plain/multifd-zstd",
        "migrate-plain/multifd-zstd+tls=x509", "migrate-plain/none+tls=psk+inject-tls-psk-mismatch"]
    assert {p.id: p.reason for p in plan.pruned} == {
        "migrate-plain/none+tls=x509+inject-tls-psk-mismatch":
            "inject tls-psk-mismatch needs --tls psk (this run: --tls x509)"}
    with pytest.raises(UsageError, match="unknown tls 'ssl'"):
        parse_matrix({"nestvirt_matrix": 1, "include": [{"scenario": "migrate-plain",
                                                           "tls": "ssl"}]}, "t.yaml")


def test_the_cli_refuses_a_tls_fault_without_its_tls(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "harness", "run", "migrate-plain", "--compression",
                        "none", "--inject", "tls-authz-reject", "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "nestvirt: error: inject tls-authz-reject needs --tls x509 (this run: --tls none)")
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


def test_every_tls_fault_names_its_mode_and_its_evidence():
    tls_faults = {n: f for n, f in FAULTS.items() if f.needs_tls}
    assert set(tls_faults) == {"tls-wrong-ca", "tls-wrong-hostname", "tls-authz-reject",
                               "tls-psk-mismatch"}
    for f in tls_faults.values():
        assert f.must_fail == "migration-completed" and f.detail_re and "before-dst" in f.actions
        assert "destination: " in f.detail_re  # judged by the destination's own line
        assert f.unfit("none", False) and f.unfit(f.needs_tls, False) is None


@needs_certtool
@pytest.mark.qemu
def test_psk_migration_passes_and_is_recorded(ctx: RunContext):
    from .test_scenarios import run

    r = run(ctx, "migrate-plain", "none", tls="psk")
    assert r.verdict == "pass", r.reason
    assert r.params["migration"]["tls"] == "psk" and r.params["tls"]["kind"] == "psk"
    s, d = (r.params["migration_settings"][k]["parameters"] for k in ("src", "dst"))
    assert s["tls-creds"].startswith("nvtls-src") and d["tls-creds"] == "nvtls-dst"
    key = (Path(r.artifacts["dir"]) / "tls" / "server" / "keys.psk").read_text().split(":")[1]
    for f in Path(r.artifacts["dir"]).glob("*"):
        if f.is_file():
            assert key.strip() not in f.read_text(errors="replace"), f"PSK in {f.name}"
    assert (Path(r.artifacts["dir"]).stat().st_mode & 0o777) == 0o700
    # The destination listened on loopback only, on a port its kernel picked.
    dst_qmp = (Path(r.artifacts["dir"]) / "dst-qmp.jsonl").read_text()
    assert '"uri": "tcp:127.0.0.1:0"' in dst_qmp and "0.0.0.0" not in dst_qmp
