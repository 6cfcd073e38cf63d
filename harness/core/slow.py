"""How much slower than a plain run here the guests of this run are: every deadline set by a
guest's speed (boot, programs starting, a migration, a stall) is multiplied by it.

Inside the host VM an inner L1 runs on KVM that TCG emulates, several times slower than an L1
on TCG directly; its job sets NESTVIRT_TIMEOUT_SCALE so that a slow guest is not a hang. A user
on a slow or loaded host sets it the same way. Results record it (results.json run block).
"""

from __future__ import annotations

import os

from harness.core.errors import UsageError

ENV = "NESTVIRT_TIMEOUT_SCALE"
MAX = 20.0  # beyond this a hang would take hours to be called one


def factor() -> float:
    """The scale asked for (1 when unset); UsageError when it is not a number in 1..MAX."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 1.0
    try:
        f = float(raw)
    except ValueError:
        raise UsageError(f"{ENV}={raw!r}: not a number") from None
    if not 1.0 <= f <= MAX:
        raise UsageError(f"{ENV}={raw}: must be between 1 and {MAX:g}")
    return f


def scaled(seconds: float) -> float:
    """``seconds`` stretched by the run's scale."""
    return seconds * factor()
