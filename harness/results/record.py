"""results.json, the one schema of a run: write it atomically, read it back, exit status."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from harness.core import slow
from harness.core.errors import UsageError
from harness.scenario.result import ScenarioResult

SCHEMA_VERSION = 1


def run_record(out: Path, **fields: Any) -> dict[str, Any]:
    """results.json's "run" block as a run opens: how it was called, when, where, by whom."""
    return {"argv": sys.argv, "started": time.strftime("%FT%T%z"), "out": str(out),
            "pid": os.getpid(), "timeout_scale": slow.factor(), **fields}


def write_results(out: Path, host: dict, results: list[ScenarioResult],
                  run_info: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write OUT/results.json atomically (a Ctrl-C mid-run still leaves the scenarios done).

    ``extra`` adds top-level keys (matrix runs: "matrix", "pruned", "repeats").
    """
    doc = {"schema": SCHEMA_VERSION, "run": run_info, "host": host,
           "scenarios": [r.to_json() for r in results], **(extra or {})}
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2, default=str))
    except OSError:
        tmp.unlink(missing_ok=True)  # the last complete results.json stays as it was
        raise
    tmp.replace(path)
    return path


def exit_status(results: list[ScenarioResult]) -> int:
    """0 when nothing failed or errored (known issues are reported, not counted), else 1."""
    return 1 if any(r.verdict in ("fail", "error") for r in results) else 0


def load_results(path: Path) -> tuple[dict[str, Any], list[ScenarioResult]]:
    """Read a results.json: the whole document and its scenarios as ScenarioResults.

    Raises ValueError (with the path) when the file is not a results document.
    """
    try:
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("scenarios"), list):
            raise ValueError("no 'scenarios' list")
        return doc, [ScenarioResult.from_json(s) for s in doc["scenarios"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a nestvirt results.json ({e})") from e


# Logs, transcripts and results of a run take a few MiB; below this a run would fill the disk.
MIN_FREE_MIB = 32


def prepare_out(out: Path | None) -> Path:
    """The run's results directory (default results/<time>), created and proven writable."""
    out = out or Path("results") / time.strftime("%Y%m%d-%H%M%S")
    try:
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        if created:
            out.chmod(0o700)  # variants' dirs below hold SSH and TLS keys
        probe_file = out / ".writable"
        probe_file.write_text("x" * 4096)
        probe_file.unlink()
        st = os.statvfs(out)
    except OSError as e:
        raise UsageError(f"--out {out}: not writable ({e.strerror})") from e
    free_mib = st.f_bavail * st.f_frsize >> 20
    if free_mib < MIN_FREE_MIB:
        raise UsageError(f"--out {out}: only {free_mib} MiB free on its filesystem (a run "
                         f"needs at least {MIN_FREE_MIB} MiB for logs and results)")
    return out


def link_latest(out: Path) -> None:
    """Point OUT/../latest at this run (a convenience: failures to link are ignored)."""
    latest = out.parent / "latest"
    try:
        if latest.is_symlink():
            latest.unlink()
        if not latest.exists():
            latest.symlink_to(out.name)
    except OSError:
        pass
