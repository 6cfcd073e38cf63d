"""What the harness promises about security: what reaches a shell or QEMU's option parser is
checked, run and socket directories are private. (Remote commands are quoted:
tests/test_remote.py; no secret in any artefact of a cross-host TLS run: tests/test_two_hosts.py.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.core.errors import UsageError
from harness.scenario.spec import ScenarioSpec, Variant
from harness.scenario.suite import SCENARIOS
from harness.vm.migration import MigrationMode


def test_spec_numbers_that_reach_l1s_shell_must_be_numbers():
    good = ScenarioSpec.from_json(SCENARIOS["migrate-plain"].to_json())
    assert good == SCENARIOS["migrate-plain"]
    for field, bad in (("l1_mib", "64; reboot"), ("l2_pages", True), ("smp", -1),
                       ("l1_workload", "yes")):
        with pytest.raises(TypeError, match=field):
            ScenarioSpec.from_json({**SCENARIOS["migrate-plain"].to_json(), field: bad})
    with pytest.raises(UsageError, match="variant file"):
        Variant.from_json({**Variant(SCENARIOS["migrate-plain"], MigrationMode()).to_json(),
                           "spec": {**SCENARIOS["migrate-plain"].to_json(),
                                    "l1_rate_mib_s": "$(reboot)"}})


def test_qmp_socket_dirs_are_private(tmp_path: Path):
    from harness.vm.machine import Machine, MachineConfig

    m = Machine(MachineConfig("src", "qemu", "tcg", "max", Path("k"), Path("i"), ""), tmp_path, 0)
    d = m.qmp_socket.parent
    try:
        assert (d.stat().st_mode & 0o777) == 0o700
    finally:
        shutil.rmtree(d)


def test_a_variant_file_cannot_add_cpu_properties_through_a_profile():
    from harness.host.enlightenments import Profile, load_profiles

    for p in load_profiles().values():
        assert Profile.from_json(p.to_json()) == p  # every shipped profile still loads
    for flags in (["hv-relaxed,pmu=off"], ["kvm=off"], ["hv-relaxed=on,hv-vapic"]):
        with pytest.raises(UsageError, match="in variant file"):
            Profile.from_json({"name": "x", "flags": flags})
    with pytest.raises(UsageError, match="in variant file"):
        Profile.from_json({"name": "x", "values": [["hv-spinlocks", "0x1fff,pmu=off"]]})


def test_a_run_dir_nestvirt_makes_is_private_and_one_it_is_given_is_left_alone(tmp_path: Path):
    from harness.results.record import prepare_out

    made = prepare_out(tmp_path / "new" / "run")
    assert (made.stat().st_mode & 0o777) == 0o700
    given = tmp_path / "given"
    given.mkdir(mode=0o755)
    os.chmod(given, 0o755)
    prepare_out(given)
    assert (given.stat().st_mode & 0o777) == 0o755
