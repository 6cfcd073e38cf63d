#!/usr/bin/env python3
"""Is the study measuring QEMU or itself? One point of `nestvirt bench compression` (boot L1,
start l1work, migrate once through the counting relay with every QEMU thread sampled) against
a bare script doing the same with QEMU and qemu.qmp only (direct TCP, nothing sampled), same
QEMU, guest, workload and mode, rounds alternated. Prints QEMU's own total-time and
pages-per-second medians for both, their ratio, and what the harness's samplers cost (thread
sampler CPU share of one core, relay CPU seconds). Never asserts on timing.

    python ci/bench_overhead.py [--rounds 5] [--mode multifd-zstd] [--bandwidth-mib 0]
                                [--qemu 10.0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.bench.plan import Axes, Workload  # noqa: E402
from harness.bench.study import StudyOptions, run_study  # noqa: E402
from harness.core import proc  # noqa: E402
from harness.guest.image import build_l1, build_tools  # noqa: E402
from harness.guest.kernel import find_kernel  # noqa: E402
from harness.host.probe import firmware_args, launch_env  # noqa: E402
from harness.qemu.inventory import machine_for, probe_host, select  # noqa: E402
from harness.scenario.engine import RunContext  # noqa: E402
from harness.vm.migration import MigrationMode  # noqa: E402

WORKLOAD = Workload(mib=64, rate_mib_s=16, entropy=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_bare(q, image, mode: MigrationMode, out: Path) -> dict:
    """Boot, l1work, one migration: QEMU + qemu.qmp + paramiko and nothing of the harness's."""
    import subprocess

    import paramiko
    from qemu.qmp.legacy import QEMUMonitorProtocol

    key = paramiko.ECDSAKey.generate(bits=256)
    append = f"console=ttyS0 panic=-1 loglevel=6 nestvirt.sshkey={key.get_name()}:{key.get_base64()}"
    sock = Path(tempfile.mkdtemp(prefix="nvover-"))
    procs: list[subprocess.Popen] = []
    monitors: list = []
    t0 = time.monotonic()

    def until(pred, what: str, limit: float = 240.0, every: float = 0.05) -> None:
        while True:
            try:
                if pred():
                    return
            except (OSError, EOFError, ValueError, paramiko.SSHException):
                pass  # dropbear refusing a channel for a moment under load: ask again
            if time.monotonic() - t0 > limit:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(every)

    def qemu(name: str, incoming: bool):
        port = free_port()
        argv = [q.binary, *firmware_args(q.firmware_dirs), "-name", f"{name},debug-threads=on",
                "-machine", f"{machine_for(q)},accel=tcg", "-cpu", "max", "-m", "512", "-smp", "1",
                "-nodefaults", "-display", "none", "-no-reboot",
                "-kernel", str(image.kernel.image), "-initrd", str(image.initramfs), "-append", append,
                "-serial", f"file:{out}/{name}.con", "-serial", f"file:{out}/{name}.ev",
                "-netdev", f"user,id=n,hostfwd=tcp:127.0.0.1:{port}-:22",
                "-device", "virtio-net-pci,netdev=n,romfile=",
                "-qmp", f"unix:{sock}/{name}.qmp,server=on,wait=off"]
        if incoming:
            argv += ["-incoming", "defer"]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=launch_env(q.module_dir))
        procs.append(p)
        until(lambda: (sock / f"{name}.qmp").exists(), f"{name} QMP socket", 30)
        m = QEMUMonitorProtocol(str(sock / f"{name}.qmp"))
        for _ in range(200):
            try:
                m.connect()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.02)
        monitors.append(m)
        return m, port

    try:
        src, sport = qemu("src", False)
        until(lambda: "NESTVIRT-EVENT ready" in Path(f"{out}/src.ev").read_text(errors="replace"), "L1 ready")
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        for _ in range(300):
            try:
                c.connect("127.0.0.1", port=sport, username="root", pkey=key, timeout=5,
                          allow_agent=False, look_for_keys=False)
                break
            except Exception:  # noqa: BLE001 - dropbear not up yet
                time.sleep(0.1)

        def sh(cmd: str) -> str:
            _, o, _ = c.exec_command(cmd, timeout=30)
            text = o.read().decode()
            o.channel.close()
            return text

        sh(f"setsid l1work run {WORKLOAD.l1work_args()} --status /run/w.st >/dev/null 2>&1 </dev/null &")
        until(lambda: '"running"' in sh("cat /run/w.st 2>/dev/null"), "l1work running", every=0.3)
        # As the harness: the destination starts, then a quiet second of workload, then migrate
        # (a destination still starting up while the stream arrives made the bare side 9% slower).
        dst, _ = qemu("dst", True)
        time.sleep(1.2)
        mport = free_port()
        for m in (dst, src):
            m.cmd("migrate-set-capabilities", capabilities=[
                {"capability": k, "state": v} for k, v in mode.capabilities().items()])
            m.clear_events()
            m.cmd("migrate-set-parameters", **mode.parameters("src"))
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{mport}")
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{mport}")
        # Wait on QEMU's MIGRATION event, as the harness does: polling query-migrate every
        # 50 ms costs the source's main loop and slowed the bare side by 5-9% (8 rounds, twice).
        def ended() -> bool:
            ev = src.pull_event(wait=0.5)
            return bool(ev and ev.get("event") == "MIGRATION"
                        and ev.get("data", {}).get("status") in ("completed", "failed", "cancelled"))

        until(ended, "migration", every=0.0)
        info = src.cmd("query-migrate")
        c.close()
        ram = info.get("ram", {})
        return {"status": info["status"], "total_time_ms": info.get("total-time"),
                "pages_per_second": ram.get("pages-per-second"),
                "run_pages_per_second": _run_pps(ram.get("normal"), info.get("total-time")),
                "load": os.getloadavg()[0]}
    finally:
        for m in monitors:
            try:
                m.close()
            except Exception:  # noqa: BLE001 - a QEMU that already went: nothing to close
                pass
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def _run_pps(normal_pages: int | None, total_ms: int | None) -> float | None:
    """Pages with content per second over the whole migration (QEMU's pages-per-second is its
    last iteration's rate and swings 20x between runs of the same point here)."""
    return round(normal_pages / (total_ms / 1000)) if normal_pages and total_ms else None


def one_harness(ctx: RunContext, q, mode_name: str, channels: int, bandwidth_mib: int) -> dict:
    axes = Axes(modes=(mode_name,), threads=(channels,), repeat=1, workloads=(WORKLOAD,),
                bandwidth_mib=(bandwidth_mib,))
    doc = run_study(ctx, StudyOptions(axes=axes, qemus=(q,), seed=0, bound_s=120, warmup=False))
    [run] = [r for c in doc["chains"] for r in c["runs"]]
    st = run["stats"]
    return {"status": run["status"], "total_time_ms": st.get("total_time_ms"),
            "pages_per_second": st.get("ram_pages_per_second"),
            "run_pages_per_second": _run_pps(st.get("ram_normal"), st.get("total_time_ms")),
            "sampler_share": run["sampler"].get("share"), "relay_cpu_s": run["sampler"].get("relay_cpu_s"),
            "load": run["load"][0]}


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: each QEMU started here is killed


def main() -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return _main()
    finally:
        proc.reap_all()  # the harness side's QEMUs


def _main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", default="multifd-zstd")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--bandwidth-mib", type=int, default=0,
                    help="max-bandwidth for both sides (0: none); a throttled stream's time depends "
                         "on QEMU's own pacing more than on a loaded host's CPU")
    ap.add_argument("--qemu", help="binary selector (default: the inventory's newest)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    facts = probe_host("tcg")
    q = select(facts.qemus, a.qemu) if a.qemu else facts.qemu
    image = build_l1(find_kernel(), build_tools())
    mode = MigrationMode(compression=a.mode, channels=a.channels, max_bandwidth_mib=a.bandwidth_mib)
    runs: dict[str, list[dict]] = {"bare": [], "harness": []}
    for i in range(a.rounds):
        for side in (("bare", "harness") if i % 2 == 0 else ("harness", "bare")):
            out = Path(tempfile.mkdtemp(prefix=f"nvover-{side}-"))
            try:
                r = (one_bare(q, image, mode, out) if side == "bare" else
                     one_harness(RunContext(host=facts, image=image, out=out), q, a.mode, a.channels,
                                 a.bandwidth_mib))
            except Exception as e:  # noqa: BLE001 - one lost round is reported, the rest goes on
                r = {"status": "error", "error": repr(e)[:300], "load": os.getloadavg()[0]}
            runs[side].append(r)
            print(f"round {i + 1} {side}: {r}", file=sys.stderr, flush=True)

    def med(side: str, key: str) -> float | None:
        xs = [r[key] for r in runs[side] if r.get("status") == "completed" and r.get(key) is not None]
        return statistics.median(xs) if xs else None

    summary: dict = {"qemu": q.version, "mode": a.mode, "channels": a.channels, "rounds": a.rounds,
                     "bandwidth_mib": a.bandwidth_mib,
                     "workload": WORKLOAD.key, "label": "emulated (TCG)", "runs": runs}
    for key in ("total_time_ms", "pages_per_second", "run_pages_per_second"):
        b, h = med("bare", key), med("harness", key)
        summary[key] = {"bare": b, "harness": h, "harness_over_bare": round(h / b, 3) if b and h else None}
    summary["sampler_share_max"] = max((r["sampler_share"] for r in runs["harness"]
                                        if r.get("sampler_share") is not None), default=None)
    summary["relay_cpu_s_max"] = max((r["relay_cpu_s"] for r in runs["harness"]
                                      if r.get("relay_cpu_s") is not None), default=None)
    summary["load_1min"] = [r["load"] for side in runs.values() for r in side]
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
