"""Is L1's vCPU in SVM guest mode (running L2) right now? Read from TCG's own log.

No QMP or HMP field shows SVM guest mode under TCG. TCG logs one ``vmrun! ADDR`` line per
VMRUN L1 executes and one ``vmexit(CODE, ...)!`` line per #VMEXIT back to L1 when QEMU runs with
``-d in_asm -dfilter 0x1+0x1 -D FILE`` (the filter keeps the in_asm code dumps out: only these
lines are written, and they are flushed line by line). More VMRUNs than #VMEXITs means L1 is in
guest mode. Read while the vCPU is stopped (a migration at pre-switchover), the count is exact.

Why it matters: QEMU refuses, on the destination, a vCPU that stopped in guest mode without KVM
nested state ("vCPU set in guest-mode inconsistent with migrated kernel nested state",
target/i386/machine.c), and under TCG there never is any. So a live nested migration under
TCG can only succeed when the stop lands while L1 runs its own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The QEMU options that make TCG write the log this module reads.
TCG_SVM_LOG_ARGS = ("-d", "in_asm", "-dfilter", "0x1+0x1")

_VMRUN = b"vmrun! "
_VMEXIT = b"vmexit("


@dataclass(frozen=True)
class GuestModeState:
    """VMRUNs and #VMEXITs seen so far; ``in_guest_mode`` when L2 was entered and not left."""

    vmruns: int
    vmexits: int

    @property
    def in_guest_mode(self) -> bool:
        return self.vmruns > self.vmexits

    def describe(self) -> str:
        where = "in guest mode (running L2)" if self.in_guest_mode else "outside guest mode"
        return f"L1 {where}: {self.vmruns} VMRUN, {self.vmexits} #VMEXIT"


def count_svm_lines(data: bytes) -> tuple[int, int]:
    """(VMRUN lines, #VMEXIT lines) in a chunk of complete log lines."""
    runs = exits = 0
    for line in data.splitlines():
        if line.startswith(_VMRUN):
            runs += 1
        elif line.startswith(_VMEXIT):
            exits += 1
    return runs, exits


class SvmTrace:
    """Counts one QEMU's TCG log incrementally: each read() parses only what was appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._runs = 0
        self._exits = 0

    def read(self) -> GuestModeState:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            data = b""  # QEMU opens the log at its first line: nothing logged, nothing run
        self._offset += len(data)
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        # A line still being written is kept for the next read, never counted twice.
        self._partial = data[cut:]
        runs, exits = count_svm_lines(data[:cut])
        self._runs += runs
        self._exits += exits
        return GuestModeState(self._runs, self._exits)
