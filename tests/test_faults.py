"""The fault table (harness/scenario/faults.py): data, not engine branches."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from harness.core.errors import UsageError
from harness.scenario import faults
from harness.scenario.faults import FAULTS, POINTS, At, Fault, get_fault
from harness.scenario.suite import SCENARIOS

ENGINE = Path(faults.__file__).with_name("engine.py")

# The faults that existed when the table was made, with the check each must fail: moving them
# from the engine into the table kept every one.
ORIGINAL = {
    "corrupt-l1": "l1-workload-pattern", "corrupt-l2": "l2-memory-pattern",
    "stop-l2": "l2-progress", "kill-dst": "dst-qemu-alive", "kernel-warning": "kernel-log-clean",
    "ssh-down": "l1-ssh-on-dst", "run-dst-before-compare": "ram-identical",
    "cancel-migration": "migration-completed", "freeze-dst": "l1-responsive-on-dst",
    "unload-kvm": "l2-starts-on-dst", "panic-dst": "dst-qemu-alive",
}


def test_table_keeps_every_original_fault_and_its_check():
    assert {n: FAULTS[n].must_fail for n in ORIGINAL} == ORIGINAL


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_each_fault_is_shown_on_a_scenario_that_runs_its_check(name: str):
    f = FAULTS[name]
    spec = SCENARIOS[f.scenario]
    # One on the harness's own ground (its disk) is judged by the run's reason instead.
    assert f.must_fail in spec.checks or (not f.must_fail and f.reason_re), (f.must_fail,
                                                                           spec.checks)
    assert f.unobservable(spec) is None
    # It acts somewhere: at a point of the run, or on how the first destination starts.
    assert (f.actions or f.dst_config) and set(f.actions) <= set(POINTS)


def test_the_engine_names_no_fault():
    # Adding a fault must not touch the engine: no fault's name appears in its source.
    text = ENGINE.read_text()
    named = [n for n in FAULTS if re.search(rf"['\"]{re.escape(n)}['\"]", text)]
    assert not named, named
    assert "spec.inject ==" not in text


def test_unobservable_names_the_missing_condition():
    live = SCENARIOS["migrate-plain"]
    paused = SCENARIOS["migrate-paused-identity"]
    assert "paused migration" in FAULTS["run-dst-before-compare"].unobservable(live)
    assert "guest checks" in FAULTS["corrupt-l1"].unobservable(paused)
    assert "running L2" in FAULTS["stop-l2"].unobservable(live)
    assert "L1 workload" in FAULTS["corrupt-l1"].unobservable(replace(live, l1_workload=False))


def test_act_runs_only_the_action_of_its_point():
    calls: list[str] = []
    probe = Fault("probe", "records where it acted",
                  {"in-guest": lambda at: calls.append("in-guest"),
                   "after-l2-progress": lambda at: calls.append("resume")},
                  must_fail="l2-progress", scenario="migrate-nested")
    FAULTS["probe"] = probe
    try:
        at = At(None, None)
        for point in POINTS:
            faults.act("probe", point, at)
        faults.act(None, "in-guest", at)
    finally:
        del FAULTS["probe"]
    assert calls == ["in-guest", "resume"]


def test_an_unknown_fault_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown fault 'nope'"):
        get_fault("nope")
    with pytest.raises(AssertionError):
        Fault("bad", "a point that does not exist", {"mid-air": lambda at: None},
              must_fail="x", scenario="migrate-plain")


def test_a_shell_fault_at_a_point_without_shell_is_an_engine_bug():
    with pytest.raises(AssertionError, match="needs a shell"):
        FAULTS["corrupt-l1"].actions["in-guest"](At(None, None))


def test_a_stop_since_the_watch_began_is_a_death_and_a_resume_undoes_it():
    from types import SimpleNamespace

    from harness.vm.machine import Machine

    vm = SimpleNamespace(events_seen=[{"event": "STOP"}], _drain_events=lambda: None,
                         _not_running=lambda: None)

    def stopped() -> str | None:
        return Machine._stopped_since(vm, 1)  # type: ignore[arg-type]

    # A stop before the watch began (an incoming VM before its migration) is not this wait's.
    assert stopped() is None
    vm.events_seen += [{"event": "RESUME"}, {"event": "STOP"}]
    assert stopped() == "its vCPUs were stopped (QMP STOP event)"
    vm._not_running = lambda: "its vCPUs are not running (QEMU run state internal-error)"
    assert "internal-error" in stopped()
    vm.events_seen.append({"event": "RESUME"})
    assert stopped() is None


def test_only_a_reset_or_a_close_before_the_banner_counts_as_refused():
    import paramiko

    from harness.guest.l1 import was_refused

    def banner_error(cause: BaseException) -> paramiko.SSHException:
        try:
            try:
                raise cause
            except BaseException as e:
                # As paramiko wraps what it read: implicitly chained (its __context__).
                raise paramiko.SSHException("Error reading SSH protocol banner" + str(e))  # noqa: B904
        except paramiko.SSHException as wrapped:
            return wrapped

    assert was_refused(banner_error(ConnectionResetError(104, "Connection reset by peer")))
    assert was_refused(banner_error(EOFError()))
    # An L1 that does not answer (a timeout) or a key it refuses is not "nothing listens".
    assert not was_refused(banner_error(TimeoutError("timed out")))
    assert not was_refused(paramiko.AuthenticationException("Authentication failed."))
    assert not was_refused(ConnectionRefusedError(111, "refused"))  # QEMU's own port is gone
