#!/usr/bin/env python3
"""Benchmark: the KVM host VM. Three figures, each through the real command line:

1. host VM boot to ready (`nestvirt hostvm boot`: QEMU start to the init's ready event;
   target <= 10 s), and the image build when the image is stale;
2. one nested-migrate scenario inside, end to end with the host VM's boot
   (`nestvirt run --in-hostvm migrate-nested --compression none`; target <= 60 s);
3. `nestvirt run --in-hostvm migrate-nested --compression none --repeat N` (default 10):
   passes, and how many stops the KVM nested tracepoints show in guest mode.

Timings are printed, never asserted; run under `nice` on a shared machine and quote ratios.

    python ci/bench_hostvm.py [--boots 3] [--repeat 10] [--skip-repeat] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def nestvirt(*args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    cp = subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)
    return cp, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--skip-repeat", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    res: dict = {}
    cp, build_s = nestvirt("hostvm", "build")
    res["build"] = {"seconds": round(build_s, 2), "said": cp.stdout.strip()}
    print(f"image: {cp.stdout.strip()} ({build_s:.1f}s with Python start)")
    with tempfile.TemporaryDirectory(prefix="nestvirt-bench-hostvm-") as tmp:
        ready, total = [], []
        for i in range(a.boots):
            out = Path(tmp) / f"boot{i}"
            cp, _ = nestvirt("hostvm", "boot", "--out", str(out), "--json")
            doc = json.loads(cp.stdout) if cp.returncode == 0 else {}
            sec = doc.get("outcome", {}).get("seconds", {})
            if "boot_to_ready" in sec:
                ready.append(sec["boot_to_ready"])
                total.append(sec["total"])
            else:
                print(f"boot {i}: failed: {cp.stderr.strip()[-300:]}")
        if ready:
            res["boot_to_ready_s"] = {"median": statistics.median(ready), "all": ready}
            res["boot_probe_poweroff_s"] = {"median": statistics.median(total), "all": total}
            print(f"boot to ready: median {statistics.median(ready):.2f}s of {ready} "
                  f"(target 10s); boot + inner probe + power-off: median "
                  f"{statistics.median(total):.1f}s")
        out = Path(tmp) / "one"
        cp, wall = nestvirt("run", "--in-hostvm", "migrate-nested", "--compression", "none",
                            "--out", str(out))
        doc = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() \
            else {}
        sc = doc.get("scenarios", [{}])[0]
        res["one_nested"] = {"wall_s": round(wall, 2), "verdict": sc.get("verdict"),
                             "scenario_total_s": sc.get("durations", {}).get("total"),
                             "hostvm_seconds": doc.get("run", {}).get("hostvm", {})
                             .get("outcome", {}).get("seconds")}
        print(f"migrate-nested in the host VM, end to end with its boot: {wall:.1f}s "
              f"(target 60s), verdict {sc.get('verdict')}, the scenario itself "
              f"{sc.get('durations', {}).get('total')}s")
        if not a.skip_repeat:
            out = Path(tmp) / "repeat"
            cp, wall = nestvirt("run", "--in-hostvm", "migrate-nested", "--compression",
                                "none", "--repeat", str(a.repeat), "--out", str(out))
            doc = json.loads((out / "results.json").read_text()) \
                if (out / "results.json").exists() else {"scenarios": []}
            scs = doc["scenarios"]
            passed = sum(s["verdict"] == "pass" for s in scs)
            evidence = sum(any(c["name"] == "kvm-nested-state" and c["ok"] for c in s["checks"])
                           for s in scs)
            in_gm = sum(bool(s["metrics"].get("stop_in_guest_mode")) for s in scs)
            res["repeat"] = {"n": a.repeat, "wall_s": round(wall, 2), "pass": passed,
                             "nested_state_check_ok": evidence, "stops_in_guest_mode": in_gm,
                             "verdicts": [s["verdict"] for s in scs]}
            print(f"--repeat {a.repeat}: {passed}/{len(scs)} pass, kvm-nested-state ok in "
                  f"{evidence}, stops in guest mode {in_gm}, {wall:.0f}s in all")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
