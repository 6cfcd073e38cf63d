"""The matrix's in_hostvm axis: which combinations run here and which in the KVM host VM, their
ids, what the plugins leave out, and the KVM-aware host budget. A real mixed run (here and in
the host VM, one boot) is tests/test_hostvm.py's kvm_run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.core.errors import UsageError
from harness.host.probe import HostFacts
from harness.matrix.batch import fit_kvm_vcpus
from harness.matrix.files import (
    combinations,
    expand_matrix,
    has_hostvm_part,
    parse_matrix,
)
from tests.test_cli import nestvirt

HOSTS = Path(__file__).parent / "data" / "hosts"


def host(name: str) -> HostFacts:
    return HostFacts.from_json(json.loads((HOSTS / f"{name}.json").read_text()))


MIXED = {"nestvirt_matrix": 1, "name": "mixed", "include": [
    {"scenario": "migrate-plain", "compression": "none"},
    {"scenario": ["migrate-nested-guest-mode", "dirty-ring"], "compression": "multifd-zstd",
     "in_hostvm": True},
    {"scenario": "migrate-nested", "compression": "none", "in_hostvm": [False, True]},
]}


def mixed():
    return parse_matrix(MIXED, "mixed.yaml")


def test_each_part_keeps_its_own_combinations_and_counts_the_rest():
    m = mixed()
    here = expand_matrix(m, host("tcg-debian12"), part="here")
    assert [p.id for p in here.variants] == ["migrate-plain/none", "migrate-nested/none"]
    assert here.elsewhere == 3 and not any(p.in_hostvm for p in here.variants)
    inside = expand_matrix(m, host("amd-kvm"), part="hostvm")
    assert [p.id for p in inside.variants] == ["migrate-nested-guest-mode/multifd-zstd+hostvm",
                                               "dirty-ring/multifd-zstd+hostvm",
                                               "migrate-nested/none+hostvm"]
    assert inside.elsewhere == 2 and all(p.in_hostvm for p in inside.variants)
    # [false, true] is the same combination in both places, under two ids.
    every = expand_matrix(m, host("amd-kvm"))
    assert len(every.variants) == 5 and every.elsewhere == 0
    assert combinations(m) == 5 and combinations(m, "hostvm") == 3
    assert combinations(m, "here") == 2
    assert has_hostvm_part(m)
    assert not has_hostvm_part(parse_matrix({**MIXED, "include": MIXED["include"][:1]}, "x"))


def test_the_plan_record_says_where_each_variant_runs():
    doc = expand_matrix(mixed(), host("amd-kvm"), part="hostvm").to_json()
    assert all(v["in_hostvm"] for v in doc["variants"]) and doc["elsewhere"] == 2
    here = expand_matrix(mixed(), host("tcg-debian12"), part="here").to_json()
    assert not any("in_hostvm" in v for v in here["variants"])


def test_an_exclude_can_name_the_axis():
    m = parse_matrix({**MIXED, "exclude": [{"scenario": "dirty-ring", "in_hostvm": True,
                                            "reason": "not tonight"}]}, "x")
    plan = expand_matrix(m, host("amd-kvm"), part="hostvm")
    assert {p.id: p.reason for p in plan.pruned} == {
        "dirty-ring/multifd-zstd+hostvm": "excluded by the matrix: not tonight"}


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_the_axis_takes_booleans_only(value):
    with pytest.raises(UsageError, match="in_hostvm"):
        parse_matrix({**MIXED, "include": [{"scenario": "migrate-plain", "in_hostvm": value}]},
                     "x")


def test_an_unknown_part_is_refused():
    with pytest.raises(UsageError, match="unknown matrix part"):
        expand_matrix(mixed(), host("tcg-debian12"), part="there")


def test_under_kvm_a_variant_wider_than_the_host_runs_alone_instead_of_skipping():
    plan = expand_matrix(mixed(), host("amd-kvm"), part="hostvm")
    ring = next(p for p in plan.variants if p.variant.spec.name == "dirty-ring")
    assert ring.needs.cpus == 2
    fitted = fit_kvm_vcpus(plan, 1)
    assert {p.id: p.needs.cpus for p in fitted.variants} == {p.id: 1 for p in plan.variants}
    assert [p.needs.mem_mib for p in fitted.variants] == [p.needs.mem_mib for p in plan.variants]


def test_bad_input_about_parts_is_one_line_and_exit_2(tmp_path: Path):
    f = tmp_path / "m.yaml"
    f.write_text("nestvirt_matrix: 1\nname: m\ninclude:\n  - scenario: migrate-plain\n"
                 "    in_hostvm: true\n")
    for args, needle in ((["run", "migrate-plain", "--matrix-part", "here"], "goes with --matrix"),
                         (["run", "--matrix", str(f), "--matrix-part", "nowhere"], "invalid choice"),
                         (["run", "--matrix", str(f), "--accel", "tcg"], "--accel tcg"),
                         (["run", "--matrix", str(f), "--hostvm-mem", "1024"], "--hostvm-mem")):
        cp = nestvirt(*args, "--out", str(tmp_path / "o"))
        assert cp.returncode == 2, (args, cp.stderr)
        assert needle in cp.stderr and "Traceback" not in cp.stderr, (args, cp.stderr)


def test_the_host_vm_part_is_bounded_per_scenario():
    from harness.hostvm.run import BOOT_BOUND_S, SCENARIO_BOUND_S, VARIANT_BOUND_S, matrix_bound
    from harness.matrix.files import combination_scenarios

    m = parse_matrix({**MIXED, "include": [*MIXED["include"],
                                           {"scenario": "dirty-limit", "in_hostvm": True}]}, "x")
    names = combination_scenarios(m, "hostvm")
    assert names == ["migrate-nested-guest-mode", "dirty-ring", "migrate-nested", "dirty-limit"]
    assert matrix_bound(names) == BOOT_BOUND_S + 3 * VARIANT_BOUND_S + SCENARIO_BOUND_S[
        "dirty-limit"]
    assert matrix_bound(names, repeat=2) > matrix_bound(names)
    assert matrix_bound(4) == BOOT_BOUND_S + 4 * VARIANT_BOUND_S
