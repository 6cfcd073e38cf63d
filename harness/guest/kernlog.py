"""What a Linux kernel's log lines say: which mean it was hurt, and how its QEMU ended.

Pure text functions, shared by the machine (a QEMU that exited), the checks and the selftests.
"""

from __future__ import annotations

import re
import signal

# Kernel log lines that mean L1 (or its KVM) was hurt; KVM's own warnings come with "kvm".
BAD_KERNEL_LINE = re.compile(
    r"WARNING:|\bOops\b|\bBUG:|kernel BUG at|general protection fault|Kernel panic|Call Trace:|"
    r"list_(?:add|del) corruption|invalid opcode: \d+ \[#|\[#\d+\] (?:PREEMPT|SMP)|"
    r"bad rss-counter|NX-protected page|"
    r"kvm.*(?:error|fail|unsupported|unhandled|invalid)|soft lockup|hung_task|"
    r"unsupported EVMCS|nested_vmx.*fail|rcu_sched detected stall|rcu: INFO",
    re.IGNORECASE,
)


# Lines after which L1 is dead or no longer to be trusted: a panic, or an oops of the kernel
# itself (a user process's "general protection fault" line in traps: is not one).
DEATH_LINE = re.compile(
    r"Kernel panic - not syncing|\bOops\b|kernel BUG at|BUG: (?:unable to handle|kernel NULL)|"
    r"\[#\d+\] (?:PREEMPT|SMP)")


def death_line(lines: list[str]) -> str | None:
    """The line that says the kernel died (the panic line if there is one), or None."""
    dead = [ln.strip() for ln in lines if DEATH_LINE.search(ln)]
    if not dead:
        return None
    return next((ln for ln in dead if "Kernel panic" in ln), dead[0])


def bad_lines(lines: list[str]) -> list[str]:
    """The lines that mean the kernel (or its KVM) was hurt, stripped, in order."""
    return [ln.strip() for ln in lines if BAD_KERNEL_LINE.search(ln)]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return "unknown"


def qemu_exit_story(error_lines: list[str], returncode: int | None, console: list[str]) -> str:
    """How an L1's QEMU ended, in one line: its stderr, else its status and L1's last words."""
    killed = (f"killed by signal {-returncode} ({_signal_name(-returncode)})"
              if returncode is not None and returncode < 0 else None)
    if error_lines:
        # A signal is said first: stderr then holds what QEMU said before, not why it ended.
        return (f"{killed}; stderr: " if killed else "") + " | ".join(error_lines[-3:])
    if killed:
        how = killed
    elif returncode == 0:
        how = "status 0, no stderr (L1 powered off, or reset under -no-reboot)"
    else:
        how = f"status {returncode}, no stderr"
    bad = bad_lines(console)
    if not bad:
        return how
    # The panic line says how it ended; the first bad line is usually why.
    last = ([ln for ln in bad if "Kernel panic" in ln] or bad)[-1]
    first = "" if last == bad[0] else f" (first of {len(bad)} bad lines: {bad[0][:160]})"
    return f"{how}; L1 console: {last[:160]}{first}"
