"""One JSON form per record type, beside its dataclass: what a worker, repro.sh and the avocado
runner read back is exactly what was written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.errors import UsageError
from harness.guest.image import GuestTools, L1Image
from harness.guest.kernel import Kernel
from harness.host.enlightenments import get_profile
from harness.host.probe import HostFacts
from harness.scenario.checks import Check
from harness.scenario.result import ScenarioResult
from harness.scenario.spec import Variant
from harness.scenario.suite import SCENARIOS
from harness.vm.migration import MigrationMode

DATA = Path(__file__).parent / "data"


def trip(obj):
    """to_json -> JSON text -> from_json, as a record crosses a process boundary."""
    return type(obj).from_json(json.loads(json.dumps(obj.to_json())))


def test_variant_round_trips_with_every_part():
    v = Variant(SCENARIOS["migrate-nested"], MigrationMode("compress", threads=3, level=4,
                                                            wait_thread=False),
                get_profile("windows"), get_profile("none"))
    assert trip(v) == v
    assert trip(v.mode) == v.mode and trip(v.spec) == v.spec and trip(v.profile) == v.profile


def test_variant_with_an_unknown_field_is_a_usage_error():
    d = Variant(SCENARIOS["migrate-plain"], MigrationMode()).to_json()
    d["mode"]["turbo"] = True
    with pytest.raises(UsageError, match="variant file"):
        Variant.from_json(d)


def test_image_round_trips_and_refuses_a_cleaned_cache(tmp_path: Path):
    for name in ("vmlinuz", "initramfs.cpio"):
        (tmp_path / name).write_bytes(b"x")
    img = L1Image(Kernel(tmp_path / "vmlinuz", tmp_path, "6.1.0", "host"), tmp_path / "initramfs.cpio",
                  "abc", GuestTools(tmp_path / "tools-k1", "k1"), ("kvm", "kvm_amd"))
    assert trip(img) == img
    (tmp_path / "initramfs.cpio").unlink()
    with pytest.raises(UsageError, match="is gone"):
        trip(img)


def test_result_round_trips():
    r = ScenarioResult(id="migrate-plain/none", scenario="migrate-plain", verdict="fail",
                       reason="x", params={"a": 1}, durations={"total": 1.5},
                       metrics={"migration": {"downtime_ms": 3}},
                       checks=[Check("dst-qemu-alive", False, "gone")], artifacts={"dir": "d"})
    assert trip(r) == r


@pytest.mark.parametrize("path", sorted((DATA / "hosts").glob("*.json")), ids=lambda p: p.stem)
def test_recorded_host_facts_round_trip(path: Path):
    facts = HostFacts.from_json(json.loads(path.read_text()))
    assert trip(facts) == facts
