"""Cross-host migration on real QEMU between two network-namespace hosts (tests/conftest.py
two_hosts): the source in A, each destination started in B over SSH, the migration over the
veth between them; with TLS and every check; the link cut mid-stream; no secret in any
artefact; and a matrix spread over both hosts by pytest-xdist workers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.remote.link import Link
from harness.remote.ssh import RemoteHost
from harness.remote.testhosts import TestHosts
from harness.scenario.engine import RunContext
from harness.scenario.faults import FAULTS
from harness.scenario.suite import SCENARIOS
from harness.vm.tls import missing_tool

from .test_scenarios import run

pytestmark = pytest.mark.qemu
REPO = Path(__file__).resolve().parent.parent
# Files that hold keys on purpose (the run's own L1 key and TLS credentials, all 0600 in 0700).
KEY_FILES = re.compile(r"(^|/)(id_ecdsa|tls/.*)$")


def secrets_of(hosts: TestHosts, workdir: Path) -> dict[str, str]:
    """What must never be logged: the remote login key and every TLS private key and PSK,
    each as the text a log would carry (a base64 line, the hex key)."""
    found = {"dst-host key": _pem_body(Path(str(hosts.dst.key_file)))}
    for key in (workdir / "tls").rglob("*-key.pem"):
        found[str(key.relative_to(workdir))] = _pem_body(key)
    for psk in (workdir / "tls").rglob("keys.psk"):
        found[str(psk.relative_to(workdir))] = psk.read_text().strip().split(":", 1)[1]
    return found


def _pem_body(path: Path) -> str:
    lines = [x for x in path.read_text().splitlines() if x and not x.startswith("-----")]
    return max(lines, key=len)  # a full 64-character base64 line of the key


def leaked(out: Path, secrets: dict[str, str]) -> list[str]:
    """Every (file, secret) where an artefact other than the key files holds a secret."""
    hits = []
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(f.relative_to(out))
        if KEY_FILES.search(rel):
            continue
        text = f.read_text(errors="replace")
        hits += [f"{rel}: {name}" for name, value in secrets.items() if value in text]
    return hits


def remote(ctx: RunContext, hosts: TestHosts, stall: float = 15.0) -> RunContext:
    return dataclasses.replace(ctx, dst_host=hosts.dst, stall_timeout=stall)


def test_nested_migrates_across_hosts_with_tls_and_every_check(ctx: RunContext,
                                                                 two_hosts: TestHosts):
    if missing_tool("x509"):
        pytest.skip(missing_tool("x509"))
    with two_hosts.on_source():
        r = run(remote(ctx, two_hosts), "migrate-nested", "none", tls="x509")
    assert r.verdict == "pass", r.reason
    assert {c.name for c in r.checks} == set(SCENARIOS["migrate-nested"].checks)
    dest = r.params["destination"]
    assert dest["host"] == two_hosts.dst.label and two_hosts.pair is not None
    assert dest["link_dev"] == two_hosts.pair.dev_a  # the migration crossed the veth
    work = Path(r.artifacts["dir"])
    transcript = (work / "src-qmp.jsonl").read_text()
    assert f'"uri": "tcp:{two_hosts.dst.addr}:' in transcript
    # Verified both ways: the source checked the destination's certificate, the destination's
    # authz let in exactly the source's identity.
    assert r.params["tls"]["authz_allows"] == "O=nestvirt,CN=src.nestvirt.test"
    src, dst = (r.params["migration_settings"][k]["parameters"] for k in ("src", "dst"))
    assert src["tls-hostname"] == "dst.nestvirt.test" and dst["tls-authz"] == "nvtls-authz"
    # The destination ran in B: its command line says where; its logs came back here.
    assert (work / "dst-cmdline.txt").read_text().startswith(f"# on {two_hosts.dst.label}\n")
    assert {"dst-console.log", "dst-qemu.stderr", "dst-qmp.jsonl", "l2-serial.log"} <= set(
        r.artifacts["files"])
    assert r.metrics["ran_on"]["netns"] == (
        f"net:[{Path('/run/netns', two_hosts.source_ns).stat().st_ino}]")
    # Its private directory there is gone, and no key was logged.
    assert dest["remote_dir"].startswith("/tmp/nestvirt-dst-")
    with two_hosts.on_source():
        h = RemoteHost(two_hosts.dst).connect()
        try:
            assert h.run(["ls", "-A", "/tmp"], 10).out == ""
        finally:
            h.close()
    assert not leaked(ctx.out, secrets_of(two_hosts, work))


def test_the_leak_scan_finds_a_planted_secret(tmp_path: Path):
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "keys.psk").write_text("qemu:00ff\n")
    (tmp_path / "id_ecdsa").write_text("SECRET-LINE\n")
    (tmp_path / "dst-qmp.jsonl").write_text('{"msg": "object-add", "dir": "/x"}\n')
    assert leaked(tmp_path, {"psk": "00ff", "key": "SECRET-LINE"}) == []  # key files only
    (tmp_path / "dst-qemu.stderr").write_text("oops: qemu:00ff\n")
    assert leaked(tmp_path, {"psk": "00ff", "key": "SECRET-LINE"}) == ["dst-qemu.stderr: psk"]


def test_a_cut_link_ends_in_a_verdict_the_source_survives_and_a_retry_completes(
        two_hosts: TestHosts, tmp_path: Path):
    out = tmp_path / "out"
    # Through the command line, as QA would run it on host A.
    argv = ["ip", "netns", "exec", two_hosts.source_ns, sys.executable, "-m", "harness", "run",
            "migrate-plain", "--compression", "none", "--downtime-limit-ms", "5000",
            "--inject", "cut-link", "--stall-timeout", "4", "--out", str(out),
            *two_hosts.dst_args()]
    p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    (r,) = doc["scenarios"]
    assert doc["run"]["dst_host"] == two_hosts.dst.label
    checks = {c["name"]: c for c in r["checks"]}
    cut = checks["migration-completed"]
    assert r["verdict"] == "fail" and not cut["ok"]
    assert re.search(FAULTS["cut-link"].detail_re or "", cut["detail"]), cut["detail"]
    assert "no progress for 4s" in cut["detail"] and "migrate_cancel -> cancelled" in cut["detail"]
    # The source kept running and verifies; the same source then migrated to a new
    # destination once the link was back, and that one passes every destination check.
    assert checks["source-intact"]["ok"], checks["source-intact"]["detail"]
    assert checks["retry-completed"]["ok"], checks["retry-completed"]["detail"]
    for name in ("dst-qemu-alive", "l1-ssh-on-dst", "l1-workload-pattern", "kernel-log-clean"):
        assert checks[name]["ok"], checks[name]
    assert r["metrics"]["cancel_ms"] < 10_000  # the cancel itself was answered
    # The failed attempt's destination files were kept apart from the retry's.
    kept = Path(r["artifacts"]["dir"]) / "attempt-1"
    assert (kept / "dst-cmdline.txt").read_text().startswith(f"# on {two_hosts.dst.label}")
    assert "dst-cmdline.txt" in r["artifacts"]["files"]
    # The link is back as it was: up, no throttle left.
    with two_hosts.on_source():
        link = Link.towards(two_hosts.dst.addr)
        assert link.is_up()
        qdisc = subprocess.run(["tc", "qdisc", "show", "dev", link.dev], capture_output=True,
                               text=True, timeout=10).stdout
    assert "tbf" not in qdisc


def test_a_cut_link_fault_needs_a_second_host(ctx: RunContext):
    from harness.scenario.engine import run_variant
    from harness.scenario.spec import Variant
    from harness.vm.migration import MigrationMode

    spec = dataclasses.replace(SCENARIOS["migrate-plain"], inject="cut-link")
    r = run_variant(Variant(spec, MigrationMode()), ctx)
    assert r.verdict == "skip" and "needs a destination on another host" in r.reason


MATRIX = """\
nestvirt_matrix: 1
name: scaleout
include:
  - scenario: migrate-plain
    compression: [none, multifd-zstd]
    l1_mib: 16
    l1_rate_mib_s: 1
    downtime_limit_ms: 5000
"""


def test_xdist_workers_in_each_host_share_one_matrix(two_hosts: TestHosts, tmp_path: Path):
    """Scale-out with pytest-xdist, no scheduler of ours: one popen worker per host, started by
    `ip netns exec HOST python`; the controller merges both workers' records. The worker on A
    sends its destinations to B ($NESTVIRT_DST_HOST in its python=), the one on B keeps its
    own: each worker drives its own host pair."""
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    assert two_hosts.pair is not None
    d = two_hosts.dst
    matrix = tmp_path / "scaleout.yaml"
    matrix.write_text(MATRIX)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
            "--rootdir", str(tmp_path), "-d",
            "--tx", f"popen//python=env NESTVIRT_DST_HOST=root@{d.addr} NESTVIRT_DST_KEY="
                    f"{d.key_file} NESTVIRT_DST_KNOWN_HOSTS={d.known_hosts} "
                    f"ip netns exec {two_hosts.pair.a} {sys.executable}",
            "--tx", f"popen//python=ip netns exec {two_hosts.pair.b} {sys.executable}",
            str(matrix), "--nestvirt-out", str(out)]
    from .test_runners import pytest_plugin_args

    p = subprocess.run(argv[:3] + pytest_plugin_args() + argv[3:], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode in (0, 1), p.stdout[-3000:] + p.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    got = {s["id"]: s for s in doc["scenarios"]}
    assert [i.split("+")[0] for i in got] == ["migrate-plain/none", "migrate-plain/multifd-zstd"]
    assert {s["verdict"] for s in got.values()} <= {"pass", "known-issue"}, [
        (i, s["verdict"], s["reason"][:200]) for i, s in got.items()]
    inode = {f"net:[{Path('/run/netns', ns).stat().st_ino}]": ns
             for ns in (two_hosts.pair.a, two_hosts.pair.b)}
    where = {inode.get(s["metrics"]["ran_on"]["netns"]): s["params"]["destination"]["host"]
             for s in got.values()}
    # One variant ran on each host; A's went to B over SSH, B's stayed on B.
    assert where == {two_hosts.pair.a: d.label, two_hosts.pair.b: "local"}, where
    assert {q.name for q in out.iterdir() if q.is_dir()} == {"gw0", "gw1"}
