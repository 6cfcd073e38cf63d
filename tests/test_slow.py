"""The timeout scale (core.slow): what stretches, what is refused, what a run records."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.core import slow
from harness.core.errors import UsageError
from harness.hostvm.job import INNER_SCALE, render_job
from harness.results.record import run_record


def test_unset_is_one_and_a_scale_stretches_every_deadline(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(slow.ENV, raising=False)
    assert slow.factor() == 1.0 and slow.scaled(30) == 30
    monkeypatch.setenv(slow.ENV, "2.5")
    assert slow.scaled(30) == 75
    from harness.scenario.engine import RunContext
    fields = RunContext.__dataclass_fields__
    assert fields["boot_timeout"].default_factory() == 150  # type: ignore[misc]
    assert fields["migrate_timeout"].default_factory() == 300  # type: ignore[misc]


@pytest.mark.parametrize("value", ["x", "0", "0.99", "21", "nan"])
def test_out_of_range_or_not_a_number_is_refused(monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv(slow.ENV, value)
    with pytest.raises(UsageError, match=slow.ENV):
        slow.factor()


def test_the_run_block_records_the_scale(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv(slow.ENV, "4")
    assert run_record(tmp_path)["timeout_scale"] == 4.0


def test_the_host_vm_job_stretches_the_inner_run(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(slow.ENV, raising=False)
    assert f"export {slow.ENV}={INNER_SCALE:g}\n" in render_job(["list"], trace=False)
    monkeypatch.setenv(slow.ENV, "10")  # the outer scale multiplies, capped at the maximum
    assert f"export {slow.ENV}={slow.MAX:g}\n" in render_job(["list"], trace=False)
