"""The avocado test behind every matrix variant (avocado-instrumented).

avocado runs one instance per runnable that harness/runners/avocado_plugin.py produced; the variant,
the probe and the L1 image come in as the avocado parameter ``nestvirt_job`` (a parallel.Job as
JSON), so this process neither probes nor builds. Artefacts go to the test's avocado output
dir. Verdicts: pass -> PASS, fail -> FAIL (failed checks in the message), error -> ERROR,
skip -> CANCEL (avocado's "not run here", with the probe's reason), known-issue -> WARN.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

# avocado imports this file by path: make the harness package importable from a checkout.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from avocado import Test  # noqa: E402 - after the path fix above

from harness.matrix.workers import HostBudget, Job, execute_job, failure_text  # noqa: E402


class NestvirtVariant(Test):
    """One nestvirt variant, run through the same engine as the CLI and pytest runners."""

    timeout = 1800  # seconds; a variant takes under a minute under TCG, longer when queued

    def test(self) -> None:
        raw = self.params.get("nestvirt_job")
        if not raw:
            self.error("no nestvirt_job parameter: run a matrix file or an avocado recipe "
                       "from `nestvirt matrix FILE --avocado-recipe OUT.json`")
        job = Job.from_json(json.loads(raw))
        out = Path(self.outputdir)
        plan = self.params.get("nestvirt_plan")
        if plan:
            # Lets `nestvirt report JOBDIR` list the pruned combinations with the results.
            (out / "nestvirt-plan.json").write_text(plan)
        job = replace(job, out=str(out))
        record = execute_job(job, budget=HostBudget())
        result = record["result"]
        self.whiteboard = json.dumps({k: result[k] for k in ("id", "verdict", "reason")})
        verdict = result["verdict"]
        if verdict == "skip":
            self.cancel(result["reason"])
        elif verdict == "known-issue":
            self.log.warning("known issue: %s", result["reason"])
        elif verdict == "fail":
            self.fail(failure_text(record))
        elif verdict != "pass":
            self.error(failure_text(record))
