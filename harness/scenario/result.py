"""What one run of a variant produced (ScenarioResult), how it is judged from its checks, and the
guard that turns a harness error into a verdict while always tearing the machines down."""

from __future__ import annotations

import errno
import json
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, Protocol

from harness.core import proc
from harness.core.errors import NestvirtError
from harness.scenario.checks import Check


@dataclass
class ScenarioResult:
    id: str
    scenario: str
    verdict: str = ""  # pass | fail | skip | error; "" until judged
    reason: str = ""
    params: dict = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["checks"] = [c.to_json() for c in self.checks]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ScenarioResult:
        """One scenarios[] entry of results.json back as a ScenarioResult (inverse of to_json)."""
        return cls(
            id=str(d["id"]), scenario=str(d.get("scenario", "")), verdict=str(d.get("verdict", "")),
            reason=str(d.get("reason", "")), params=dict(d.get("params") or {}),
            durations=dict(d.get("durations") or {}), metrics=dict(d.get("metrics") or {}),
            checks=[Check(str(c["name"]), bool(c["ok"]), str(c.get("detail", "")))
                    for c in d.get("checks") or []],
            artifacts=dict(d.get("artifacts") or {}))


class Timer:
    """Wall time of each named phase of a run, into result.durations; a phase entered again
    (a retried migration) adds to its time."""

    def __init__(self, result: ScenarioResult) -> None:
        self.result = result

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - t0 + self.result.durations.get(name, 0.0)
            self.result.durations[name] = round(took, 3)


class Steps(Protocol):
    def execute(self) -> None: ...

    def teardown(self) -> None: ...


def execute_guarded(run: Steps, res: ScenarioResult, workdir: Path) -> None:
    """Run the steps; a harness error or an engine bug becomes an 'error' with its reason,
    and teardown (reaping QEMU) always happens. Ctrl-C still propagates after teardown."""
    t0 = time.monotonic()
    try:
        run.execute()
    except Exception as e:  # noqa: BLE001 - an engine bug must still leave a result behind
        if proc.interrupted():
            # Ctrl-C that a library turned into its own error (qemu.qmp: ConnectError, or
            # asyncio's TimeoutError, an OSError): a stop, not a result.
            raise KeyboardInterrupt from e
        if isinstance(e, NestvirtError):
            res.verdict, res.reason = "error", str(e)
        elif isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            # the results disk, not the engine: say which write it refused
            res.verdict, res.reason = "error", f"out of disk: {failed_write(e)}"
        else:
            _internal_error(res, workdir, e)
    finally:
        run.teardown()
        res.durations["total"] = round(time.monotonic() - t0, 3)


# A write refused by the filesystem itself: full, over quota, read-only, too big.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def failed_write(e: OSError) -> str:
    """'writing PATH failed: REASON' for a refused write; the path from the error, else from
    the innermost frame that was writing a path (pathlib's, or a file object's name)."""
    path = e.filename
    tb = e.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        if path:
            break
        for name in ("self", "path", "fh", "f"):
            v = frame.f_locals.get(name)
            if isinstance(v, PurePath):
                path = str(v)
            elif isinstance(getattr(v, "name", None), str) and hasattr(v, "write"):
                path = v.name
            if path:
                break
    return f"writing {path or 'a file'} failed: {e.strerror or e}"


def _internal_error(res: ScenarioResult, workdir: Path, e: BaseException) -> None:
    res.verdict, res.reason = "error", f"internal error: {type(e).__name__}: {e}"
    try:
        (workdir / "traceback.txt").write_text(traceback.format_exc())
    except OSError:
        pass  # the reason above is kept with the result either way


def judge_failed_checks(res: ScenarioResult) -> bool:
    """A failed check makes a fail, even if a later step errored (its error is appended)."""
    failed = [c for c in res.checks if not c.ok]
    if not failed:
        return False
    why = "; ".join(f"{c.name}: {c.detail}" for c in failed)
    if res.verdict == "error":
        why += f"; then: {res.reason}"
    res.verdict, res.reason = "fail", why[:1000]
    return True


def save_result(res: ScenarioResult, workdir: Path) -> ScenarioResult:
    """List the artefacts and write scenario.json beside them. A disk that refuses it leaves
    the result in memory (for results.json and the console) with the refusal said in it."""
    res.artifacts["files"] = sorted(p.name for p in workdir.iterdir() if p.is_file())
    try:
        (workdir / "scenario.json").write_text(json.dumps(res.to_json(), indent=2, default=str))
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        res.artifacts["unsaved"] = failed_write(e)
        (workdir / "scenario.json").unlink(missing_ok=True)  # no torn half left behind
    return res


def finish(res: ScenarioResult, workdir: Path) -> ScenarioResult:
    """Judge by the checks; a run that reached no check is an error, never a pass."""
    if not judge_failed_checks(res) and res.verdict == "":
        res.verdict = "pass" if res.checks else "error"
        res.reason = "" if res.checks else "no check ran"
    return save_result(res, workdir)
