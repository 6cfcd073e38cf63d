"""Fast start: the saved, booted L1 image (harness/vm/snapshot.py) and the start that restores
and re-keys it (harness/scenario/l1start.py). Keying and staleness are pure; building,
reuse, re-keying, corruption and the scenarios run real QEMU."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from harness.core.cache import file_digest
from harness.core.errors import NestvirtError, StepTimeout
from harness.guest.image import build_tools
from harness.guest.l1 import HostKey, L1Shell, RunKey
from harness.scenario import l1start
from harness.scenario.engine import RunContext, l1_config, launch_config, run_variant
from harness.scenario.spec import Variant
from harness.scenario.suite import SCENARIOS
from harness.vm import snapshot
from harness.vm.machine import MachineConfig
from harness.vm.migration import MigrationMode


def _cfg(tmp: Path, **kw) -> MachineConfig:
    for f in ("qemu", "kernel", "initrd"):
        (tmp / f).write_bytes(f.encode())
    base = {"name": "src", "qemu": str(tmp / "qemu"), "accel": "tcg", "cpu": "max",
            "kernel": tmp / "kernel", "initrd": tmp / "initrd", "append": "console=ttyS0"}
    return MachineConfig(**{**base, **kw})


def test_key_changes_with_everything_that_shapes_l1(tmp_path: Path):
    base = _cfg(tmp_path)
    k = snapshot.snapshot_key(base, "10.0.2")
    assert k == snapshot.snapshot_key(base, "10.0.2")
    # What only names or logs the machine, or where its control port ends, is not its state.
    for same in (replace(base, name="dst"), replace(base, tcg_svm_log=tmp_path / "svm"),
                 replace(base, control=True), replace(base, incoming=True)):
        assert snapshot.snapshot_key(same, "10.0.2") == k
    changed = [replace(base, mem_mib=1024), replace(base, mem_extra_kib=8), replace(base, smp=2),
               replace(base, cpu="max,+hv-relaxed"), replace(base, machine="pc-q35-7.2"),
               replace(base, accel="kvm"), replace(base, append="console=ttyS0 quiet"),
               replace(base, extra_args=("-global", "x=1")),
               replace(base, firmware_dirs=(str(tmp_path),))]
    keys = {snapshot.snapshot_key(c, "10.0.2") for c in changed}
    assert len(keys) == len(changed) and k not in keys
    assert snapshot.snapshot_key(base, "7.2.22") != k
    assert snapshot.snapshot_key(base, "10.0.2", recipe="other") != k
    # The same path with other bytes (a rebuilt kernel, an upgraded QEMU) is another image.
    (tmp_path / "kernel").write_bytes(b"a longer kernel")
    k2 = snapshot.snapshot_key(base, "10.0.2")
    assert k2 != k
    # An initramfs is named by its content: the same one elsewhere is the same image, another
    # name is another.
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "initrd").write_bytes(b"initrd")
    assert snapshot.snapshot_key(replace(base, initrd=other / "initrd"), "10.0.2") == k2
    (other / "initramfs-other.cpio").write_bytes(b"initrd")
    assert snapshot.snapshot_key(replace(base, initrd=other / "initramfs-other.cpio"),
                                 "10.0.2") != k2


def _write_image(d: Path, key: str, stream: bytes, **over) -> snapshot.SnapshotImage:
    d.mkdir(parents=True, exist_ok=True)
    (d / snapshot.STREAM).write_bytes(stream)
    img = snapshot.SnapshotImage(key=key, dir=d, sha256=file_digest(d / snapshot.STREAM),
                                 size=len(stream))
    img = replace(img, **over)
    (d / snapshot.META).write_text(json.dumps(img.to_json()))
    return img


def test_stale_or_half_made_images_are_never_used(tmp_path: Path):
    d = tmp_path / "img"
    assert "no complete image" in snapshot.stale_reason(d, "k1")
    img = _write_image(d, "k1", b"x" * 100)
    assert snapshot.stale_reason(d, "k1") is None
    assert snapshot.SnapshotImage.from_json(img.to_json()) == img  # the record's codec
    assert snapshot.SnapshotImage.from_json(replace(img, quiet_s=0.4).to_json()).quiet_s == 0.4
    assert "not k2" in snapshot.stale_reason(d, "k2")
    _write_image(d, "k1", b"x" * 100, format=snapshot.SNAPSHOT_FORMAT - 1)
    assert "format" in snapshot.stale_reason(d, "k1")
    _write_image(d, "k1", b"x" * 100)
    (d / snapshot.STREAM).write_bytes(b"x" * 99)  # cut short after the record was written
    assert "99 bytes" in snapshot.stale_reason(d, "k1")
    (d / snapshot.META).write_text("{not json")
    assert "unreadable" in snapshot.stale_reason(d, "k1")


def test_prune_removes_unused_images_and_leftovers_only(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NESTVIRT_CACHE", str(tmp_path))
    root = tmp_path / "l1-snapshots"
    for key in ("old", "fresh", "kept"):
        _write_image(root / key, key, b"x")
    (root / "half.123.tmp").mkdir()
    now = time.time() + snapshot.UNUSED_DAYS * 86400 + 10
    for key in ("fresh",):
        os.utime(root / key / snapshot.META, (now, now))  # used just now
    gone = snapshot.prune(keep="kept", now=now)
    assert sorted(gone) == ["half.123.tmp", "old"]
    assert sorted(x.name for x in root.iterdir() if not x.name.startswith(".")) == ["fresh", "kept"]


def test_load_uri_is_file_only_where_the_qemu_reads_files():
    p = Path("/cache/l1-snapshots/k/l1.stream")
    assert snapshot.load_uri(p, True) == f"file:{p}"
    assert snapshot.load_uri(p, False) == f"exec:cat {p}"
    # file: takes options after a comma: such a path goes through cat, quoted.
    odd = Path("/cache/a,b/l1 stream")
    assert snapshot.load_uri(odd, True) == "exec:cat '/cache/a,b/l1 stream'"
    assert snapshot.reads_files(frozenset({"mapped-ram", "events"}))
    assert not snapshot.reads_files(frozenset({"compress", "events"}))  # 7.2's set


@pytest.mark.parametrize("file_uri", [False, True], ids=["exec", "file"])
def test_a_stream_qemu_refuses_is_unusable_and_nothing_is_left(ctx: RunContext, tmp_path: Path,
                                                               file_uri: bool):
    # Right digest, right size, wrong bytes for QEMU: the load itself must fail, and say so,
    # whichever way QEMU reads the file.
    if file_uri and not snapshot.reads_files(ctx.host.qemu.migration_capabilities):
        pytest.skip(f"QEMU {ctx.host.qemu.version} has no file: migration (no mapped-ram)")
    img = _write_image(tmp_path / "bad", "k", b"QEVM" + b"garbage" * 1000)
    cfg = replace(l1_config(ctx, "src", None, cpu=ctx.host.l1_cpu), control=True)
    with pytest.raises(snapshot.SnapshotUnusable, match="did not take"):
        snapshot.restore(cfg, img, lambda c: launch_config(c, tmp_path), timeout=20,
                         file_uri=file_uri)


def test_nvrekey_refuses_a_malformed_line_before_touching_anything():
    # On the host only the refusals can run: a good line would reseed and set this clock.
    tool = build_tools().dir / "nvrekey"
    for line in ("", "zz 1 t k h", "00 1 t k h", "ab" * 32 + " notanumber t k h",
                 "ab" * 32 + " 1 t k"):
        cp = subprocess.run([str(tool)], input=line + "\n", capture_output=True, text=True,
                            timeout=10)
        assert cp.returncode == 2, (line, cp.stderr)
        assert cp.stderr.startswith("nvrekey: ")


def test_image_built_once_reused_rekeyed_and_rebuilt_when_corrupt(
        ctx: RunContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NESTVIRT_CACHE", str(tmp_path / "cache"))  # a cache of its own
    cfg = l1_config(ctx, "src", None, cpu=ctx.host.l1_cpu)
    saver = RunKey.generate()
    run_a, run_b = RunKey.generate(), RunKey.generate()
    started = []

    reads_files = snapshot.reads_files(ctx.host.qemu.migration_capabilities)

    def start(key: RunKey, file_uri: bool = reads_files) -> l1start.StartedL1:
        s = l1start.start_l1(cfg, key, lambda c: launch_config(c, tmp_path), start="snapshot",
                             qemu_version=ctx.host.qemu.version, build_key=saver,
                             file_uri=file_uri)
        started.append(s)
        return s

    try:
        a = start(run_a)
        assert a.record["start"] == "snapshot" and a.record["built"], a.record
        assert a.ready.get("kvm") == "yes"
        # It was saved once L1 had gone idle (what it still had to do would be redone at
        # every restore).
        meta = json.loads((snapshot.image_dir(a.record["image"]) / snapshot.META).read_text())
        assert meta["quiet_s"] is not None, meta
        # B loads the same image the other way (through cat): both loads give a whole L1.
        b = start(run_b, file_uri=False)
        assert b.record["load"] == "exec" and a.record["load"] == (
            "file" if reads_files else "exec")
        assert not b.record["built"] and b.record["image"] == a.record["image"]
        # Run B's L1 takes only run B's key: not the saving boot's, not run A's.
        b.shell(run_b, timeout=10).close()
        for other in (saver, run_a):
            with pytest.raises(StepTimeout):
                L1Shell(b.machine.ssh_port, other, host_key=b.host_key).connect(3)
        # And serves only the host key it was given (pinned): a connection expecting another
        # one is refused outright, not retried.
        with pytest.raises(NestvirtError, match="host key other than"):
            L1Shell(b.machine.ssh_port, run_b, host_key=HostKey.generate().public).connect(10)
        # Its clock was set on restore (it stood still while the image lay in the cache), and
        # two restores of one image draw different random bytes (the CRNG was reseeded).
        sh_a, sh_b = a.shell(run_a), b.shell(run_b)
        clock = int(sh_b.run("date +%s", 10).out)
        assert abs(clock - time.time()) < 5
        rand = {sh.run("head -c 16 /dev/urandom | od -An -tx1", 10).out for sh in (sh_a, sh_b)}
        assert len(rand) == 2
        sh_a.close()
        sh_b.close()
        for s in started:
            s.machine.shutdown()
        # A byte flipped in the cached stream: detected on restore, the image built again.
        stream = snapshot.image_dir(a.record["image"]) / snapshot.STREAM
        stream.chmod(0o644)
        data = bytearray(stream.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stream.write_bytes(bytes(data))
        c = start(RunKey.generate())
        assert c.record["built"] and c.record["image"] == a.record["image"]
        assert "rebuilt_because" in c.record, c.record
    finally:
        for s in started:
            s.machine.shutdown()


@pytest.mark.parametrize("start", ["snapshot", "cold"])
def test_paused_identity_passes_from_either_start(ctx: RunContext, start: str):
    """A restored L1 passes every check, paused identity (RAM page by page, vCPU registers)
    included; --cold runs the same checks on a booted one; the result says which."""
    r = run_variant(Variant(SCENARIOS["migrate-paused-identity"], MigrationMode("multifd-zstd")),
                    replace(ctx, start=start))
    assert r.verdict == "pass", r.reason
    assert {c.name for c in r.checks} == set(SCENARIOS["migrate-paused-identity"].checks)
    assert r.params["start"]["start"] == start
    if start == "snapshot":
        assert len(r.params["start"]["image"]) == 16


def test_wait_vcpus_idle_tells_a_busy_vcpu_from_an_idle_one():
    # A thread of this process named like a QEMU vCPU: busy, then sleeping.
    assert snapshot.wait_vcpus_idle(None, 1.0) is None
    assert snapshot.wait_vcpus_idle(os.getpid(), 0.5) is None  # no vCPU thread to watch
    state = {"busy": True, "stop": False}
    named = threading.Event()

    def vcpu() -> None:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text("CPU 0/TEST")
        named.set()
        while not state["stop"]:
            if state["busy"]:
                sum(range(10_000))
            else:
                time.sleep(0.01)

    t = threading.Thread(target=vcpu, daemon=True)
    t.start()
    try:
        assert named.wait(5)
        assert snapshot.wait_vcpus_idle(os.getpid(), 0.8) is None  # busy all along
        state["busy"] = False
        took = snapshot.wait_vcpus_idle(os.getpid(), 5.0)
        assert took is not None and took < 5.0
    finally:
        state["stop"] = True
        t.join(5)
