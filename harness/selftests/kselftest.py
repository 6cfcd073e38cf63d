"""The kselftest protocol as pure functions: exit codes, skip and failure reasons, selection.

Nothing here runs anything: callers hand in what a selftest printed and how it ended (a
``SelftestRun``), or a build log, and get verdicts and one-line reasons back. Recorded outputs
under tests/data/selftests/ pin the parsing.
"""

from __future__ import annotations

import fnmatch
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass

# tools/testing/selftests/kselftest.h
KSFT_PASS = 0
KSFT_FAIL = 1
KSFT_XFAIL = 2
KSFT_XPASS = 3
KSFT_SKIP = 4

# The wrapper kills a selftest with SIGKILL at its deadline; a shell reports that as 128+9.
KILLED_STATUS = 128 + signal.SIGKILL

REASON_MAX = 300

# ksft_exit_skip() prints "1..0 # SKIP <msg>" (or "ok N # SKIP <msg>" after a plan);
# TEST_REQUIRE's message starts with "- " ("- Requirement not met: kvm_cpu_has(...)").
_TAP_SKIP = re.compile(r"^(?:1\.\.0|ok \d+)(?: [^#]*)?\s*#\s*SKIP\b\s*(?:-\s*)?(.*)$", re.IGNORECASE)
# print_skip() (lib/test_util.c) ends its message with ", skipping test".
_PRINT_SKIP = re.compile(r"^(.*?),? skipping test\.?\s*$", re.IGNORECASE)
_ASSERT_HEAD = "==== Test Assertion Failure ===="
_TAP_NOT_OK = re.compile(r"^not ok \d+\s*(.*)$")
_BAIL = re.compile(r"^Bail out!\s*(.*)$")
_BACKTRACE = re.compile(r"^\s+\d+\t")


@dataclass(frozen=True)
class SelftestRun:
    """How one selftest ended: exit status (None if it never reported one), output, time.

    ``timed_out`` is True only when the runner killed it at its deadline; ``crashed`` names
    how the kernel running it died under it (its QEMU exited), else it is None.
    """

    rc: int | None
    output: str
    seconds: float
    timed_out: bool = False
    crashed: str | None = None


@dataclass(frozen=True)
class Outcome:
    """A verdict in the harness's vocabulary (pass, fail, skip, error) and its one-line reason."""

    verdict: str
    reason: str


def classify(run: SelftestRun, timeout_s: float) -> Outcome:
    """Map a selftest's ending to a verdict: 0 pass, 4 skip, anything else fail.

    A timeout is a fail whatever status the kill produced, with reason "timeout after S s";
    a run that never reported a status (the guest stopped answering) is an error, unless the
    kernel under it died: that is a fail of the kernel under test, with its last words.
    """
    if run.timed_out:
        return Outcome("fail", f"timeout after {timeout_s:g} s")
    if run.crashed is not None:
        return Outcome("fail", _clip(f"L1 died during the test: {run.crashed}"))
    if run.rc is None:
        first = _lines(run.output)[:1] or ["the runner reported none"]
        return Outcome("error", _clip(f"no exit status: {first[0]}"))
    if run.rc == KSFT_PASS:
        return Outcome("pass", "")
    if run.rc == KSFT_SKIP:
        return Outcome("skip", skip_reason(run.output))
    return Outcome("fail", failure_reason(run.output, run.rc))


def skip_reason(output: str) -> str:
    """The selftest's own words for a skip: its TAP SKIP line, else print_skip's line.

    Falls back to the last line printed, then to a fixed text, so a skip always has a reason.
    """
    lines = _lines(output)
    for ln in lines:
        m = _TAP_SKIP.match(ln)
        if m and m.group(1).strip():
            return _clip(m.group(1))
    for ln in lines:
        m = _PRINT_SKIP.match(ln)
        if m and m.group(1).strip():
            return _clip(m.group(1))
    if lines:
        return _clip(lines[-1])
    return "exit status 4 (KSFT_SKIP) with no output"


def failure_reason(output: str, rc: int) -> str:
    """One line for a failed selftest: its assertion (file:line: expr, then message), a TAP
    "not ok" or "Bail out!" line, else its last line; always prefixed with how it exited."""
    head = exit_text(rc)
    lines = _lines(output)
    detail = _assertion(lines)
    if not detail:
        for ln in lines:
            m = _TAP_NOT_OK.match(ln) or _BAIL.match(ln)
            if m:
                detail = ln
                break
    if not detail and lines:
        detail = lines[-1]
    return _clip(f"{head}: {detail}" if detail else head)


def exit_text(rc: int) -> str:
    """ "exit 254", or "killed by SIGSEGV" for a shell's 128+N status."""
    if rc > 128:
        try:
            return f"killed by {signal.Signals(rc - 128).name}"
        except ValueError:
            pass
    return f"exit {rc}"


def _assertion(lines: list[str]) -> str:
    """TEST_ASSERT's block: "  file:line: expr", "  pid=.. errno=..", a backtrace, "  message".

    Returns "file:line: expr: message" (the message is the last indented line of the block).
    """
    if _ASSERT_HEAD not in lines:
        return ""
    i = lines.index(_ASSERT_HEAD)
    block = []
    for ln in lines[i + 1:]:
        # The backtrace comes from `addr2line | cat -n` (numbered lines), or, where addr2line
        # is missing as in L1, from the shell complaining: neither ends the block.
        if "addr2line" in ln or _BACKTRACE.match(ln):
            continue
        if not ln.startswith((" ", "\t")):
            break
        block.append(ln.strip())
    if not block:
        return "Test Assertion Failure"
    where = block[0]
    tail = [b for b in block[1:] if not b.startswith("pid=")]
    message = tail[-1] if tail else ""
    return f"{where}: {message}" if message else where


# Compiler and linker lines, best first: a real diagnostic beats the driver's summary.
_BUILD_ERROR_PATTERNS = (
    re.compile(r"\b(?:fatal )?error:(?!\s*ld returned)"),
    re.compile(r"undefined reference to|multiple definition of|cannot find -l"),
    re.compile(r"\berror\b", re.IGNORECASE),
)


def first_build_error(log: str) -> str:
    """The compiler's first error line in a build log (the linker's if nothing compiled wrong)."""
    lines = _lines(log)
    for pattern in _BUILD_ERROR_PATTERNS:
        for ln in lines:
            if pattern.search(ln) and not ln.startswith(("gcc ", "cc ", "clang ")):
                return _clip(ln)
    return _clip(lines[-1]) if lines else "build failed with no output"


def select(available: Iterable[str], filters: Iterable[str]) -> tuple[list[str], list[str]]:
    """Names from ``available`` matched by any filter (names or shell globs, comma lists
    allowed), in available's order; and the filters that matched nothing. No filters: all."""
    names = list(available)
    wanted = [f.strip() for item in filters for f in item.split(",") if f.strip()]
    if not wanted:
        return names, []
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, w) for w in wanted)]
    unmatched = [w for w in wanted if not any(fnmatch.fnmatchcase(n, w) for n in names)]
    return chosen, unmatched


def _lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.replace("\r\n", "\n").splitlines() if ln.strip()]


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."
