"""Known issues: signatures that turn a matching failure into 'known-issue' (shown apart).

A signature names the variant ids it covers (glob), the host it was seen on (accel, QEMU
version prefix) and evidence that must appear in the failure (regex over the reason). An
unmatched failure stays 'fail'; a matched one is reported as known-issue with the link.
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
    qemu_version: str | None = None  # prefix of the probe's QEMU version
    metrics_min: dict[str, float] | None = None  # dotted metric path -> least value seen in it
    link: str = ""

    def matches(self, r: ScenarioResult, accel: str, qemu_version: str) -> bool:
        return (r.verdict == "fail" and fnmatch.fnmatchcase(r.id, self.variants)
                and (self.accel is None or self.accel == accel)
                and (self.qemu_version is None or qemu_version.startswith(self.qemu_version))
                and re.search(self.evidence, r.reason) is not None
                and all(_metric(r.metrics, k) >= v for k, v in (self.metrics_min or {}).items()))


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
    except (OSError, ValueError, KeyError, TypeError, re.error) as e:
        raise UsageError(f"known issues file {path}: {e}") from e
    return sigs


def classify(results: list[ScenarioResult], sigs: list[Signature], accel: str,
             qemu_version: str) -> None:
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
