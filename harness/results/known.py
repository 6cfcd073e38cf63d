"""Known issues: signatures that turn a matching failure into 'known-issue' (shown apart).

A signature names the variant ids it covers (glob), where it was seen (accel; the QEMU version
as a prefix or a range [qemu_min, qemu_below), on the source, the destination or either side)
and evidence that must appear in the failure (regex over the reason). The versions are the
result's own (params.qemu.src/dst.version: a cross-version run has two); a result without them
is judged by the run's binary. An unmatched failure stays 'fail'; a matched one is reported as
known-issue with the link.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

from harness.core.errors import UsageError
from harness.core.paths import CI
from harness.scenario.result import ScenarioResult

DEFAULT_FILE = CI / "known-issues.json"


@dataclass(frozen=True)
class Signature:
    id: str
    variants: str  # glob over ScenarioResult.id
    evidence: str  # regex that must match the failure's reason
    description: str
    accel: str | None = None
    qemu_version: str | None = None  # prefix of the QEMU version ("7.2")
    qemu_min: str | None = None  # the range [qemu_min, qemu_below) of versions it covers
    qemu_below: str | None = None
    qemu_side: str = "any"  # whose version: "src", "dst", or "any" (either side in range)
    metrics_min: dict[str, float] | None = None  # dotted metric path -> least value seen in it
    link: str = ""

    def __post_init__(self) -> None:
        if self.qemu_side not in ("src", "dst", "any"):
            raise ValueError(f"{self.id}: qemu_side {self.qemu_side!r}: expected src, dst or any")
        for v in (self.qemu_min, self.qemu_below):
            if v is not None:
                version_key(v)  # ValueError on a malformed bound

    def covers_version(self, version: str) -> bool:
        """The version is in this signature's prefix and range (True when it sets neither)."""
        p = self.qemu_version
        if p is not None and not (version == p or version.startswith(p.rstrip(".") + ".")):
            return False
        try:
            key = version_key(version)
        except ValueError:
            return self.qemu_min is None and self.qemu_below is None
        return ((self.qemu_min is None or key >= version_key(self.qemu_min))
                and (self.qemu_below is None or key < version_key(self.qemu_below)))

    def matches(self, r: ScenarioResult, accel: str, qemu_version: str) -> bool:
        versions = result_versions(r, qemu_version)
        sides = ("src", "dst") if self.qemu_side == "any" else (self.qemu_side,)
        return (r.verdict == "fail" and fnmatch.fnmatchcase(r.id, self.variants)
                and (self.accel is None or self.accel == accel)
                and any(self.covers_version(versions[s]) for s in sides)
                and re.search(self.evidence, r.reason) is not None
                and all(_metric(r.metrics, k) >= v for k, v in (self.metrics_min or {}).items()))


def version_key(version: str) -> tuple[int, ...]:
    """"10.0.2" -> (10, 0, 2), so 10.0 sorts after 9.2 and 7.2 before 7.10; ValueError if not
    dotted numbers."""
    parts = version.strip().split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a QEMU version: {version!r}")
    return tuple(int(p) for p in parts) + (0,) * (3 - len(parts))


def result_versions(r: ScenarioResult, fallback: str) -> dict[str, str]:
    """{"src": version, "dst": version} of the binaries a result ran, else the run's."""
    q = r.params.get("qemu") if isinstance(r.params, dict) else None
    return {side: str((q or {}).get(side, {}).get("version") or fallback) for side in ("src", "dst")}


def _metric(metrics: dict, dotted: str) -> float:
    cur: object = metrics
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return float("-inf")  # absent evidence never matches
        cur = cur[part]
    return float(cur) if isinstance(cur, (int, float)) else float("-inf")


def load(path: Path = DEFAULT_FILE) -> list[Signature]:
    """Read the signatures file; a malformed one is bad input (exit 2)."""
    try:
        doc = json.loads(path.read_text())
        sigs = [Signature(**{k: v for k, v in s.items() if not k.startswith("_")})
                for s in doc["signatures"]]
        for s in sigs:
            re.compile(s.evidence)
    except (OSError, ValueError, KeyError, TypeError, re.error) as e:  # incl. a bad version bound
        raise UsageError(f"known issues file {path}: {e}") from e
    return sigs


def classify(results: list[ScenarioResult], sigs: list[Signature], accel: str,
             qemu_version: str = "") -> None:
    """Mark failures that match a signature as known-issue, keeping the original reason.

    A run with an injected fault failed on purpose: it is never explained by a known issue.
    """
    for r in results:
        if "+inject-" in r.id:
            continue
        for s in sigs:
            if s.matches(r, accel, qemu_version):
                r.verdict = "known-issue"
                r.reason = f"[{s.id}: {s.description}] {r.reason}"
                break
