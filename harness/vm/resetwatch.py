"""What an L1 was doing when it reset on its own (a triple fault, or a reboot it asked for).

Under -no-reboot a reset ends QEMU at once and leaves only "status 0, no stderr". With
NESTVIRT_RESET_REGISTERS=1 an L1's QEMU runs instead with ``-action
reboot=shutdown,shutdown=pause`` and a second QMP monitor: a guest reset stops the VM with its
registers as they were, this watcher (its own connection, its own thread) dumps them beside
the other logs, then quits QEMU, so the harness sees the same exit as before, and the exit
story names the vCPUs' RIPs at the reset.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

ENV = "NESTVIRT_RESET_REGISTERS"
# What the dump holds: every vCPU's registers, the code at vCPU 0's RIP, its local APIC.
DUMP = ("info registers -a", "x/12i $pc", "info lapic")


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def summary(registers: str) -> str:
    """'CPU#0 RIP=... CR2=... RSP=... CPL=... HLT=...; CPU#1 ...' from 'info registers -a'."""
    parts = []
    for block in registers.split("CPU#")[1:]:
        toks = block.replace("\n", " ").split()
        regs = dict(t.split("=", 1) for t in toks if "=" in t)
        got = [f"{k}={regs[k]}" for k in ("RIP", "RSP", "CR2", "CR3", "CPL", "HLT") if k in regs]
        parts.append(f"CPU#{toks[0] if toks else '?'} " + " ".join(got))
    return "; ".join(parts)


def watch(socket: Path, out: Path) -> threading.Thread:
    """Start the watcher on QEMU's second monitor; it ends with QEMU."""
    def run() -> None:
        # This thread's own event loop (qemu.qmp's legacy client runs on the thread's loop),
        # closed when the watch ends.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        qmp = QEMUMonitorProtocol(str(socket))
        try:
            qmp.connect(negotiate=True)
            while True:
                ev = qmp.pull_event(wait=True)
                if not ev or ev.get("event") != "SHUTDOWN":
                    continue
                if ev.get("data", {}).get("reason") == "guest-reset":
                    texts = [f"== {c}\n" + str(qmp.cmd_raw("human-monitor-command", {
                        "command-line": c}).get("return", "")) for c in DUMP]
                    out.write_text("\n".join(texts))
                qmp.cmd_raw("quit")  # as -no-reboot would have ended it
                return
        except (QMPError, OSError, EOFError, TimeoutError):
            return  # QEMU is gone: nothing left to read
        finally:
            try:
                qmp.close()
            except (QMPError, OSError, EOFError):
                pass  # already closed by QEMU's end
            loop.close()

    t = threading.Thread(target=run, name=f"reset-watch-{out.name}", daemon=True)
    t.start()
    return t
