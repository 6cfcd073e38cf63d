"""Matrices as data: expansion, pruning with reasons, ids, the exact variant JSON, the host
budget and the process scheduler (with a stand-in executor: no QEMU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from harness.core.errors import StepTimeout, UsageError
from harness.host.probe import HostFacts
from harness.matrix.batch import failure_rates, make_jobs
from harness.matrix.files import (
    QEMU_OVERHEAD_MIB,
    Resources,
    expand_matrix,
    load_matrix,
    matrix_id,
    needs,
    parse_matrix,
)
from harness.matrix.workers import HostBudget, Job, Reservation, run_jobs
from harness.scenario.engine import RunContext
from harness.scenario.spec import Variant
from harness.scenario.suite import SCENARIOS, expand

REPO = Path(__file__).resolve().parent.parent
HOSTS = Path(__file__).parent / "data" / "hosts"


def host(name: str) -> HostFacts:
    return HostFacts.from_json(json.loads((HOSTS / f"{name}.json").read_text()))


def doc(*blocks: dict, **top) -> dict:
    return {"nestvirt_matrix": 1, "name": "t", "include": list(blocks), **top}


def plan_of(*blocks: dict, host_name: str = "tcg-debian12", **top):
    return expand_matrix(parse_matrix(doc(*blocks, **top), "test.yaml"), host(host_name))


def pruned_reasons(plan) -> dict[str, str]:
    return {p.id: p.reason for p in plan.pruned}


# -- the shipped matrices ------------------------------------------------------------------------

def test_smoke_is_the_cli_smoke_suite_plus_bare():
    plan = expand_matrix(load_matrix(REPO / "ci" / "smoke.yaml"), host("tcg-debian12"))
    suite = [v.id for v in expand([], None, {})]
    assert [p.id for p in plan.variants] == suite + ["migrate-bare/none"]
    assert not plan.pruned
    assert [p.index for p in plan.variants] == list(range(len(plan.variants)))


def test_nightly_prunes_by_vendor_and_binary_and_skips_by_host():
    tcg = expand_matrix(load_matrix(REPO / "ci" / "nightly.yaml"), host("tcg-debian12"))
    ids = {p.id for p in tcg.variants}
    reasons = pruned_reasons(tcg)
    # eVMCS on an SVM L1 can never exist: pruned, with the vendor reason.
    assert "hv-evmcs needs Intel VMX" in reasons["migrate-plain/none/evmcs"]
    assert "drop hv-evmcs" in reasons["migrate-nested-evmcs/multifd-zstd/evmcs-linux"]
    assert "contradicts" in reasons["migrate-nested-evmcs/none/windows"]
    # Hyper-V without KVM is this host's limit, not an invalid combination: a variant that skips.
    assert "migrate-nested/none/windows" in ids
    windows = next(p for p in tcg.variants if p.id == "migrate-nested/none/windows")
    ctx = RunContext(host=host("tcg-debian12"), image=None, out=Path("."))  # type: ignore[arg-type]
    assert "need -accel kvm" in ctx.unsupported_reason(windows.variant)
    # The same file on a VMX host with QEMU 9.2: eVMCS runs, legacy compress is pruned.
    intel = expand_matrix(load_matrix(REPO / "ci" / "nightly.yaml"), host("intel-kvm-evmcs"))
    assert "migrate-nested-evmcs/multifd-zstd/evmcs-linux" in {p.id for p in intel.variants}
    assert pruned_reasons(intel)["migrate-plain/compress"].startswith(
        "not in this QEMU binary: legacy compress is absent")
    # Sizes, channels, threads and vmexit all show up with readable, unique ids.
    assert {"migrate-nested/multifd-zstd+channels=8", "migrate-nested/compress+threads=4",
            "migrate-plain/none+mem_mib=2048+smp=2+l1_mib=1024",
            "vmexit/multifd-zstd"} <= ids
    assert len(ids) == len(tcg.variants)


def test_smoke_mini_has_a_run_a_skip_and_pruned_ones():
    plan = expand_matrix(load_matrix(REPO / "ci" / "smoke-mini.yaml"), host("tcg-debian12"))
    assert len(plan.variants) == 3 and len(plan.pruned) == 2


# -- pruning rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("block,needle", [
    ({"compression": "none", "channels": 4}, "channels applies to multifd-zlib, multifd-zstd only"),
    ({"compression": "multifd-zlib", "threads": 4}, "multifd and compress capabilities are mutually"),
    ({"compression": "compress", "channels": 4}, "multifd channels with legacy compress"),
    ({"compression": "xbzrle", "level": 3}, "level applies to"),
    ({"compression": "multifd-zlib", "level": 12}, "--level 12 is not valid"),
    ({"compression": "none", "xbzrle_cache_mib": 32}, "xbzrle_cache_mib applies to xbzrle only"),
    ({"compression": "none", "inject": "corrupt-l2"}, "needs a running L2"),
    ({"compression": "none", "inject": "run-dst-before-compare"}, "needs a paused migration"),
    ({"compression": "none", "mem_mib": 256, "l1_mib": 256}, "cannot fit in a 256 MiB L1"),
    ({"compression": "none", "profile": "evmcs"}, "hv-evmcs needs Intel VMX"),
    ({"compression": "none", "hv": "hv-stimer"}, "hv-stimer needs hv-synic"),
])
def test_invalid_combinations_are_pruned_with_the_reason(block, needle):
    plan = plan_of({"scenario": "migrate-plain", **block})
    assert not plan.variants
    (p,) = plan.pruned
    assert needle in p.reason, p.reason


def test_null_means_default_and_excludes_prune_with_their_reason():
    plan = plan_of({"scenario": "migrate-nested", "compression": ["none", "multifd-zstd"],
                    "channels": [None, 8]},
                   exclude=[{"compression": "multifd-zstd", "channels": 8, "reason": "too slow"}])
    assert [p.id for p in plan.variants] == ["migrate-nested/none", "migrate-nested/multifd-zstd"]
    assert pruned_reasons(plan) == {
        "migrate-nested/none+channels=8": "channels applies to multifd-zlib, multifd-zstd only, not none",
        "migrate-nested/multifd-zstd+channels=8": "excluded by the matrix: too slow"}


def test_downtime_limit_is_an_axis_of_every_mode():
    plan = plan_of({"scenario": "migrate-plain", "compression": ["none", "xbzrle"],
                    "downtime_limit_ms": [None, 1000]})
    assert [p.id for p in plan.variants] == [
        "migrate-plain/none", "migrate-plain/none+downtime_limit_ms=1000",
        "migrate-plain/xbzrle", "migrate-plain/xbzrle+downtime_limit_ms=1000"]
    assert [p.variant.mode.downtime_limit_ms for p in plan.variants] == [None, 1000, None, 1000]
    assert "downtime-limit" in plan.variants[1].variant.mode.parameters("src")


def test_legacy_compress_on_a_binary_without_it_is_pruned_not_skipped():
    plan = plan_of({"scenario": "migrate-plain", "compression": "all"}, host_name="intel-kvm-evmcs")
    assert "migrate-plain/compress" not in {p.id for p in plan.variants}
    assert "removed 9.1" in pruned_reasons(plan)["migrate-plain/compress"]


def test_overlapping_blocks_run_a_variant_once_at_its_first_place():
    plan = plan_of({"scenario": "migrate-plain", "compression": ["none", "xbzrle"]},
                   {"scenario": ["migrate-bare", "migrate-plain"], "compression": "none"})
    assert [p.id for p in plan.variants] == ["migrate-plain/none", "migrate-plain/xbzrle",
                                             "migrate-bare/none"]


# -- bad input is UsageError, not a prune ---------------------------------------------------------

@pytest.mark.parametrize("d,needle", [
    ({"include": [{"scenario": "migrate-plain"}]}, "nestvirt_matrix: 1"),
    (doc({"scenario": "migrate-plian"}), "unknown scenario 'migrate-plian' (did you mean migrate-plain?)"),
    (doc({"scenario": "migrate-plain", "chanels": 2}), "unknown axis 'chanels' (did you mean channels?)"),
    (doc({"scenario": "migrate-plain", "compression": "lz4"}), "unknown compression 'lz4'"),
    (doc({"scenario": "migrate-plain", "profile": "windoze"}), "unknown profile 'windoze'"),
    (doc({"scenario": "migrate-plain", "hv": "hv-relaxd"}), "unknown Hyper-V flag hv-relaxd"),
    (doc({"scenario": "migrate-plain", "channels": "4"}), "expected a positive integer"),
    (doc({"scenario": "migrate-plain", "guest": [{"ram": 512}]}), "guest entries take"),
    (doc({"compression": "none"}), "needs 'scenario'"),
    ({"nestvirt_matrix": 1, "include": []}, "non-empty list"),
])
def test_typos_are_usage_errors(d, needle):
    with pytest.raises(UsageError, match=None) as e:
        parse_matrix(d, "bad.yaml")
    assert needle in str(e.value) and "bad.yaml" in str(e.value)


def test_a_file_that_is_not_yaml_is_a_usage_error(tmp_path: Path):
    f = tmp_path / "m.yaml"
    f.write_text("nestvirt_matrix: 1\ninclude: [scenario: {")
    with pytest.raises(UsageError, match="not YAML"):
        load_matrix(f)


# -- ids, variant JSON, resources -----------------------------------------------------------------

def test_ids_do_not_depend_on_writing_defaults_out():
    implicit = plan_of({"scenario": "migrate-plain", "compression": "multifd-zstd"})
    explicit = plan_of({"scenario": "migrate-plain", "compression": "multifd-zstd", "channels": 2,
                        "mem_mib": 512})
    assert [p.id for p in implicit.variants] == [p.id for p in explicit.variants] == [
        "migrate-plain/multifd-zstd"]


def test_variant_json_round_trips_every_nightly_variant():
    plan = expand_matrix(load_matrix(REPO / "ci" / "nightly.yaml"), host("intel-kvm-evmcs"))
    for pv in plan.variants:
        back = Variant.from_json(json.loads(json.dumps(pv.variant.to_json())))
        assert back == pv.variant and matrix_id(back) == pv.id


def test_variant_json_with_a_broken_profile_is_refused():
    v = plan_of({"scenario": "migrate-plain", "compression": "none"}).variants[0].variant
    d = v.to_json()
    d["profile"]["flags"] = ["hv-stimer"]
    with pytest.raises(UsageError, match="hv-stimer needs"):
        Variant.from_json(d)


def test_needs_count_both_sides_memory_and_one_side_cpus():
    spec = SCENARIOS["migrate-nested"]
    assert needs(spec) == Resources(cpus=1, mem_mib=2 * (512 + QEMU_OVERHEAD_MIB))
    assert needs(replace(spec, smp=2, mem_mib=2048)).cpus == 2


# -- the host budget ------------------------------------------------------------------------------

def test_budget_never_oversubscribes_cpus_and_forgets_dead_owners(tmp_path: Path):
    b = HostBudget(tmp_path / "budget.json", cpus=2)
    one = Resources(cpus=1, mem_mib=64)
    r1, r2 = b.try_acquire(one, "a"), b.try_acquire(one, "b")
    assert r1 and r2 and b.try_acquire(one, "c") is None
    b.release(r1)
    assert b.try_acquire(one, "c") is not None
    # A reservation whose process died (a killed runner) is dropped on the next look.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ledger = json.loads((tmp_path / "budget.json").read_text())
    ledger = [r for r in ledger if r["what"] != "b"] + [
        asdict(Reservation("x", dead.pid, 1, 64, "ghost"))]
    (tmp_path / "budget.json").write_text(json.dumps(ledger))
    assert {r.what for r in b.held()} == {"c"}


def test_budget_says_when_a_variant_can_never_fit(tmp_path: Path):
    b = HostBudget(tmp_path / "budget.json", cpus=2)
    assert "needs 4 host CPUs" in b.never_fits(Resources(cpus=4, mem_mib=64))
    assert "MiB" in b.never_fits(Resources(cpus=1, mem_mib=10**9))
    assert b.never_fits(Resources(cpus=1, mem_mib=64)) is None


def test_budget_hold_waits_then_times_out(tmp_path: Path):
    b = HostBudget(tmp_path / "budget.json", cpus=1)
    with b.hold(Resources(1, 64), "first"):
        t0 = time.monotonic()
        with pytest.raises(StepTimeout, match="no room for 1 CPU"):
            with b.hold(Resources(1, 64), "second", timeout=0.6, poll=0.1):
                pass
        assert time.monotonic() - t0 >= 0.5
    assert b.held() == []


# -- the scheduler, with a stand-in executor --------------------------------------------------------

def fake_execute(job: Job) -> dict:
    """Stands in for execute_job in the worker processes: sleeps, logs start/end, and fails
    variant 0 from attempt FAIL_AT (read from the variant's l2_pages, a field it never uses)."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / "spans.log"
    start = time.time()
    time.sleep(0.4)
    with open(log, "a") as fh:
        fh.write(f"{start} {time.time()} {job.id}\n")
    fail_at = job.variant["spec"]["l2_pages"]
    verdict = "fail" if job.index == 0 and job.attempt >= fail_at else "pass"
    return {"index": job.index, "attempt": job.attempt, "of": job.of, "id": job.id,
            "result": {"id": job.id, "scenario": "fake", "verdict": verdict,
                       "reason": "boom" if verdict == "fail" else "", "checks": [],
                       "durations": {"total": 0.4}, "metrics": {}, "params": {}, "artifacts": {}},
            "host": {}, "image": {}}


def fake_plan(fail_at: int):
    return plan_of({"scenario": "migrate-plain", "compression": ["none", "multifd-zstd", "xbzrle"],
                    "l2_pages": fail_at})


def max_overlap(spans_log: Path) -> int:
    spans = [tuple(map(float, ln.split()[:2])) for ln in spans_log.read_text().splitlines()]
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def test_scheduler_keeps_input_order_and_the_parallel_limit(tmp_path: Path):
    plan = fake_plan(fail_at=99)
    jobs = make_jobs(plan, 2, tmp_path, {}, {}, ())
    assert [j.id for j in jobs] == [f"{p.id}#{k}" for k in (1, 2) for p in plan.variants]
    done: list[str] = []
    run_jobs(jobs, parallel=2, budget=HostBudget(tmp_path / "b.json", cpus=4),
             on_done=lambda j, r: done.append(r["id"]) or True, execute=fake_execute)
    assert sorted(done) == sorted(j.id for j in jobs)
    assert max_overlap(tmp_path / "spans.log") == 2


def test_scheduler_stays_within_the_budget_even_with_more_jobs_allowed(tmp_path: Path):
    jobs = make_jobs(fake_plan(fail_at=99), 1, tmp_path, {}, {}, ())
    run_jobs(jobs, parallel=8, budget=HostBudget(tmp_path / "b.json", cpus=1),
             on_done=lambda j, r: True, execute=fake_execute)
    assert max_overlap(tmp_path / "spans.log") == 1


def test_until_fail_stops_starting_and_reports_the_attempt_and_rate(tmp_path: Path):
    plan = fake_plan(fail_at=3)
    jobs = make_jobs(plan, 10, tmp_path, {}, {}, ())
    records: list[dict] = []

    def on_done(job: Job, record: dict) -> bool:
        records.append(record)
        return record["result"]["verdict"] != "fail"

    run_jobs(jobs, parallel=1, budget=HostBudget(tmp_path / "b.json", cpus=2), on_done=on_done,
             execute=fake_execute)
    # Attempt-major order: 3 variants x 2 attempts pass, then variant 0 fails on attempt 3.
    assert len(records) == 7 and records[-1]["id"] == f"{plan.variants[0].id}#3"
    rates = {r["id"]: r for r in failure_rates(records)}
    first = rates[plan.variants[0].id]
    assert (first["runs"], first["fails"], first["rate"], first["first_fail_attempt"]) == (
        3, 1, 0.333, 3)
    assert rates[plan.variants[1].id]["rate"] == 0.0


def test_a_worker_that_dies_comes_back_as_an_error(tmp_path: Path):
    jobs = make_jobs(fake_plan(fail_at=99), 1, tmp_path, {}, {}, ())[:1]
    got: list[dict] = []
    run_jobs(jobs, parallel=1, budget=HostBudget(tmp_path / "b.json", cpus=2),
             on_done=lambda j, r: got.append(r) or True, execute=die)
    (r,) = got
    assert r["result"]["verdict"] == "error" and "worker process died" in r["result"]["reason"]


def die(job: Job) -> dict:
    os._exit(3)


# -- the command line ---------------------------------------------------------------------------

def nestvirt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args,needle", [
    (["run", "--matrix", "ci/no-such.yaml"], "ci/no-such.yaml"),
    (["run", "--matrix", "ci/smoke.yaml", "migrate-plain"], "--matrix sets scenarios"),
    (["run", "--matrix", "ci/smoke.yaml", "--repeat", "0"], "--repeat must be at least 1"),
    (["run", "-j", "-1"], "-j must be 0"),
    (["run", "--variant-json", "ci/smoke.yaml", "--inject", "kill-dst"], "one exact variant"),
    (["report", "ci/smoke.yaml"], "not a nestvirt results.json"),
])
def test_bad_matrix_input_is_one_line_and_exit_2(args, needle):
    cp = nestvirt(*args)
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], cp.stderr


def test_bad_matrix_file_is_exit_2_before_anything_starts(tmp_path: Path):
    bad = tmp_path / "m.yaml"
    bad.write_text("nestvirt_matrix: 1\ninclude:\n  - {scenario: migrate-plain, chanels: 4}\n")
    cp = nestvirt("run", "--matrix", str(bad), "--out", str(tmp_path / "out"))
    assert cp.returncode == 2 and "unknown axis 'chanels' (did you mean channels?)" in cp.stderr
    assert not (tmp_path / "out").exists()


def test_matrix_command_lists_variants_and_pruned_with_reasons():
    cp = nestvirt("matrix", "ci/smoke-mini.yaml", "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert [v["id"] for v in doc["variants"]][-1] == "migrate-plain/none/windows"
    assert all(v["needs"]["cpus"] == 1 for v in doc["variants"])
    assert doc["pruned"][0] == {"id": "migrate-plain/none+channels=4",
                                "reason": "channels applies to multifd-zlib, multifd-zstd only, "
                                          "not none"}
