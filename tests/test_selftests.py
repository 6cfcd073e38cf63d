"""KVM selftests: outcome mapping on recorded outputs, TAP/JUnit views, build isolation on a
fake tree, the host runner, the CLI's input checks, and real runs in L1 (marked qemu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.host.probe import HostFacts
from harness.results.views import junit_xml, tap
from harness.scenario.engine import RunContext
from harness.scenario.result import ScenarioResult
from harness.selftests import kselftest as ks
from harness.selftests import run as st
from harness.selftests.build import SelftestBuild, build_tree, kernel_banner, prebuilt, tree_key
from harness.selftests.kselftest import SelftestRun

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "selftests"
FAKE_TREE = DATA / "fake-tree"
HOSTS = Path(__file__).parent / "data" / "hosts"
CASES = {k: v for k, v in json.loads((DATA / "cases.json").read_text()).items()
         if not k.startswith("_")}
# The set the issue names, plus a VMX-only test, one that fails under TCG's SVM, one that
# runs far past its deadline under TCG, and one that does not build in Debian's 6.1 tree.
NAMED = ("state_test", "evmcs_test", "hyperv_cpuid", "hyperv_svm_test", "svm_vmcall_test",
         "vmx_set_nested_state_test", "nested_exceptions_test", "hardware_disable_test",
         "dirty_log_test")


def host(name: str) -> HostFacts:
    return HostFacts.from_json(json.loads((HOSTS / f"{name}.json").read_text()))


# -- exit codes and reasons, on recorded outputs --------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_recorded_outputs_map_to_verdict_and_reason(name: str):
    case = CASES[name]
    output = (DATA / "outputs" / f"{name}.txt").read_text()
    got = ks.classify(SelftestRun(case["rc"], output, 1.0, case["timed_out"]), 10)
    assert (got.verdict, got.reason) == (case["verdict"], case["reason"])


@pytest.mark.parametrize("rc,verdict", [(0, "pass"), (4, "skip"), (1, "fail"), (2, "fail"),
                                        (3, "fail"), (254, "fail"), (139, "fail")])
def test_exit_code_mapping(rc: int, verdict: str):
    assert ks.classify(SelftestRun(rc, "", 0.1), 5).verdict == verdict


def test_a_dead_kernel_is_a_fail_with_its_last_words_not_an_error():
    died = SelftestRun(None, "", 0.2, crashed="status 0, no stderr; L1 console: Kernel panic - x")
    assert ks.classify(died, 5.0) == ks.Outcome("fail", "L1 died during the test: status 0, no stderr; "
                                                        "L1 console: Kernel panic - x")
    assert ks.classify(SelftestRun(None, "", 0.2), 5.0).verdict == "error"  # no status, L1 alive


def test_timeout_wins_over_any_status_and_names_the_limit():
    for rc in (137, 0, 4, None):
        got = ks.classify(SelftestRun(rc, "ok 1\n", 7.5, timed_out=True), 7.5)
        assert (got.verdict, got.reason) == ("fail", "timeout after 7.5 s")


def test_no_status_is_an_error_carrying_the_runner_line():
    got = ks.classify(SelftestRun(None, "L1's QEMU exited: qemu: fatal\n", 2.0), 10)
    assert got.verdict == "error" and got.reason == "no exit status: L1's QEMU exited: qemu: fatal"


@pytest.mark.parametrize("output,reason", [
    ("1..0 # SKIP - Requirement not met: kvm_has_cap(KVM_CAP_X)\n",
     "Requirement not met: kvm_has_cap(KVM_CAP_X)"),
    ("TAP version 13\n1..3\nok 1 a\nok 2 # SKIP hugepages unavailable\n", "hugepages unavailable"),
    ("ok 1 test_name # SKIP not on this CPU\n", "not on this CPU"),
    ("KVM_CAP_DIRTY_LOG_RING not supported, skipping test\n", "KVM_CAP_DIRTY_LOG_RING not supported"),
    ("something odd\nlast words\n", "last words"),
    ("", "exit status 4 (KSFT_SKIP) with no output"),
])
def test_skip_reason_is_the_tests_own_words(output: str, reason: str):
    assert ks.skip_reason(output) == reason


def test_failure_reasons_name_the_signal_and_fall_back_to_tap_lines():
    assert ks.failure_reason("", 139) == "killed by SIGSEGV"
    assert ks.failure_reason("1..2\nok 1 a\nnot ok 2 b\ntrailing\n", 1) == "exit 1: not ok 2 b"
    assert ks.failure_reason("Bail out! no /dev/kvm\n", 1) == "exit 1: Bail out! no /dev/kvm"
    assert ks.failure_reason("x" * 500, 1).endswith("...")
    assert len(ks.failure_reason("x" * 500, 1)) == ks.REASON_MAX


@pytest.mark.parametrize("log,line", [
    ("dirty_log_test.log", "/CACHE/selftests-KEY.tmp/src/tools/testing/selftests/kvm/"
                           "dirty_log_test.c:775: undefined reference to `TEST_ASSERT_EQ'"),
    ("steal_time.log", "/CACHE/selftests-KEY.tmp/src/usr/include/asm/kvm.h:201:9: error: "
                       "expected specifier-qualifier-list before '__DECLARE_FLEX_ARRAY'"),
])
def test_first_build_error_on_recorded_logs(log: str, line: str):
    assert ks.first_build_error((DATA / "build-logs" / log).read_text()) == line


def test_select_by_names_globs_and_comma_lists():
    names = ["state_test", "evmcs_test", "hyperv_cpuid", "hyperv_svm_test", "svm_vmcall_test"]
    assert ks.select(names, []) == (names, [])
    assert ks.select(names, ["hyperv_*,state_test"]) == (
        ["state_test", "hyperv_cpuid", "hyperv_svm_test"], [])
    assert ks.select(names, ["svm_*", "nope", "x*"]) == (["svm_vmcall_test"], ["nope", "x*"])


def test_runner_output_parsing():
    run = st.parse_runner_output(
        "NESTVIRT-KSFT rc=4 timed_out=0 t0=10.50 t1=11.25 bytes=52\n"
        "1..0 # SKIP - Requirement not met: kvm_cpu_has(X86_FEATURE_VMX)\n", 0)
    assert (run.rc, run.timed_out, run.seconds) == (4, False, 0.75)
    assert ks.classify(run, 10).reason == "Requirement not met: kvm_cpu_has(X86_FEATURE_VMX)"
    killed = st.parse_runner_output("NESTVIRT-KSFT rc=137 timed_out=1 t0=1.00 t1=4.00 "
                                    f"bytes={st.OUTPUT_MAX + 9}\npartial\n", 0, "Killed\n")
    assert killed.timed_out and killed.rc == 137
    assert "output cut at" in killed.output and killed.output.endswith("[runner] Killed\n")
    broken = st.parse_runner_output("sh: run-one: not found\n", 127)
    assert broken.rc is None and ks.classify(broken, 10).verdict == "error"
    assert "runner failed with exit 127" in ks.classify(broken, 10).reason


def test_kernel_banner_of_a_bzimage(tmp_path: Path):
    img = bytearray(0x600)
    img[0x202:0x206] = b"HdrS"
    img[0x20E:0x210] = (0x300).to_bytes(2, "little")
    banner = b"6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP Debian 6.1.192-2 (x)"
    img[0x500:0x500 + len(banner)] = banner
    (tmp_path / "vmlinuz").write_bytes(bytes(img))
    assert kernel_banner(tmp_path / "vmlinuz") == banner.decode()
    (tmp_path / "junk").write_bytes(b"\0" * 100)
    assert kernel_banner(tmp_path / "junk") == ""


# -- TAP and JUnit --------------------------------------------------------------------------

def _results() -> list[ScenarioResult]:
    def r(name: str, verdict: str, reason: str = "", **metrics) -> ScenarioResult:
        return ScenarioResult(id=f"selftest/{name}", scenario="selftest", verdict=verdict,
                              reason=reason, params={"test": name}, durations={"total": 0.5},
                              metrics=metrics)
    return [
        r("state_test", "pass", exit_code=0),
        r("evmcs_test", "skip", "Requirement not met: kvm_cpu_has(X86_FEATURE_VMX)", exit_code=4),
        r("hyperv_features", "fail", "timeout after 10 s", exit_code=137, timed_out=True,
          timeout_s=10.0),
        r("debug_regs", "fail", "exit 254: x86_64/debug_regs.c:108: a & b < c", exit_code=254),
        r("dirty_log_test", "error", "build failed: dirty_log_test.c:775: undefined reference"),
    ]


def test_tap_is_kselftest_shaped():
    assert tap(_results(), st.tap_name).splitlines() == [
        "TAP version 13",
        "1..5",
        "ok 1 selftests: kvm: state_test",
        "ok 2 selftests: kvm: evmcs_test # SKIP Requirement not met: kvm_cpu_has(X86_FEATURE_VMX)",
        "not ok 3 selftests: kvm: hyperv_features # TIMEOUT 10 seconds",
        "# fail: timeout after 10 s",
        "not ok 4 selftests: kvm: debug_regs # exit=254",
        "# fail: exit 254: x86_64/debug_regs.c:108: a & b < c",
        "not ok 5 selftests: kvm: dirty_log_test",
        "# error: build failed: dirty_log_test.c:775: undefined reference",
        "# Totals: pass:1 fail:2 xfail:0 xpass:0 skip:1 error:1",
    ]


def test_tap_keeps_a_multiline_reason_on_one_line():
    r = ScenarioResult(id="x", scenario="selftest", verdict="skip", reason="a\nb")
    assert tap([r]).splitlines()[2] == "ok 1 x # SKIP a b"


def test_junit_counts_and_messages():
    suite = ET.fromstring(junit_xml(_results(), suite="kselftest-kvm"))
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) \
        == ("5", "2", "1", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["selftest/evmcs_test"].find("skipped").get("message") == \
        "Requirement not met: kvm_cpu_has(X86_FEATURE_VMX)"
    assert cases["selftest/hyperv_features"].find("failure").get("message") == "timeout after 10 s"
    assert cases["selftest/state_test"].find("failure") is None


# -- building: isolation and caching on a fake tree -----------------------------------------

@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("NESTVIRT_CACHE", str(root))
    return root


@pytest.fixture
def fake_build(cache: Path) -> SelftestBuild:
    return build_tree(FAKE_TREE, "tree:fake")


# The cache this session runs with (read before any test sets its own).
SESSION_CACHE = os.environ.get("NESTVIRT_CACHE")


@pytest.fixture
def fake_in_l1(fake_build: SelftestBuild, monkeypatch: pytest.MonkeyPatch) -> SelftestBuild:
    """The fake tree, built in a cache of its own, for a run in an L1 started from the saved
    images every run on this machine shares: these tests are of the runner, and an image of
    their own would cost each a 20 s build (the selection no longer changes the image)."""
    if SESSION_CACHE is None:
        monkeypatch.delenv("NESTVIRT_CACHE", raising=False)
    else:
        monkeypatch.setenv("NESTVIRT_CACHE", SESSION_CACHE)
    return fake_build


def test_a_test_that_does_not_compile_does_not_stop_the_others(fake_build: SelftestBuild):
    b = fake_build
    assert b.names() == ["sleeper", "passer", "skipper", "broken_test", "failer", "wedger", "panicker"]
    built = {t.name for t in b.tests if t.ok}
    assert built == {"sleeper", "passer", "skipper", "failer", "wedger", "panicker"}
    broken = b.get("broken_test")
    assert broken.binary is None and broken.log is not None and broken.log.is_file()
    assert broken.error == "broken_test.c:4:16: error: 'undeclared_symbol' undeclared " \
                           "(first use in this function)"
    assert b.timeout_s == 45 and not b.cached
    assert b.get("passer").relpath == "x86_64/passer"
    assert {"headers", "build"} <= set(b.timings)
    assert not list(FAKE_TREE.rglob("usr")), "the build wrote into the source tree"


def test_builds_are_cached_by_content(fake_build: SelftestBuild, tmp_path: Path):
    again = build_tree(FAKE_TREE, "tree:fake")
    assert again.cached and again.key == fake_build.key and again.dir == fake_build.dir
    assert again.get("passer").binary == fake_build.get("passer").binary
    import shutil

    copy = tmp_path / "tree"
    shutil.copytree(FAKE_TREE, copy)
    assert tree_key(copy) == fake_build.key  # the same bytes elsewhere: the same build
    src = copy / "tools/testing/selftests/kvm/x86_64/passer.c"
    src.write_text(src.read_text().replace("ok 1 passer", "ok 1 passer, edited"))
    assert tree_key(copy) != fake_build.key


def test_a_tree_without_kvm_selftests_is_a_usage_error(tmp_path: Path, cache: Path):
    from harness.core.errors import UsageError

    with pytest.raises(UsageError, match="no tools/testing/selftests/kvm/Makefile"):
        build_tree(tmp_path, "tree:empty")


def test_prebuilt_lists_static_binaries_and_refuses_dynamic_ones(fake_build: SelftestBuild,
                                                                tmp_path: Path):
    import shutil

    d = tmp_path / "prebuilt"
    shutil.copytree(fake_build.dir / "bin", d)
    shutil.copy2("/bin/true", d / "dynamic_true")
    (d / "notes.txt").write_text("not a test")
    b = prebuilt(d)
    by = {t.name: t for t in b.tests}
    assert set(by) == {"sleeper", "passer", "skipper", "failer", "wedger", "panicker", "dynamic_true"}
    assert by["passer"].ok and not by["dynamic_true"].ok
    assert "dynamically linked" in by["dynamic_true"].error


def test_payload_holds_the_runner_and_each_test_stripped(fake_build: SelftestBuild, tmp_path: Path):
    tests = [t for t in fake_build.tests if t.name in ("passer", "failer")]
    payload = st.selftest_payload(tests, tmp_path)
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=payload.read_bytes(),
                             capture_output=True, timeout=30).stdout.decode().splitlines()
    files = {ln.split()[-1]: ln.split()[0] for ln in listing}
    kvm = st.GUEST_DIR.lstrip("/") + "/kvm"
    assert {f"{kvm}/passer", f"{kvm}/failer", st.GUEST_RUNNER.lstrip("/")} <= set(files)
    assert all(files[f].startswith("-rwxr-xr-x") for f in (f"{kvm}/passer", st.GUEST_RUNNER.lstrip("/")))
    assert not (tmp_path / "stage").exists()
    # Stripped: smaller than what the build left (the build keeps debug info).
    by = {t.name: t for t in tests}
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=payload.read_bytes(), cwd=out, timeout=30, check=True)
    assert (out / kvm / "passer").stat().st_size < by["passer"].binary.stat().st_size


def test_l1_memory_stays_what_was_asked_for_small_selections():
    mib = 1 << 20
    # Up to an eighth: the memory asked for, so every such selection restores one image.
    assert st.l1_mem_mib(2048, 0) == 2048
    assert st.l1_mem_mib(2048, 256 * mib) == 2048
    # Beyond: 512 MiB steps that hold the tests.
    assert st.l1_mem_mib(2048, 256 * mib + 1) == 2048 + 512
    assert st.l1_mem_mib(2048, 700 * mib) == 2048 + 1024


# -- running on the host: the local executor and the no-KVM skip ----------------------------

def _plan(build: SelftestBuild, names: tuple[str, ...], timeout: float, on: str = "l1"):
    return st.SelftestPlan(build, names, timeout, on)


def test_host_without_kvm_gives_skips_with_the_probes_reason(fake_build: SelftestBuild,
                                                            tmp_path: Path):
    facts = host("tcg-debian12")
    results = st.run_on_host(_plan(fake_build, ("passer", "broken_test"), 5, "host"), facts,
                             tmp_path)
    assert [r.verdict for r in results] == ["skip", "error"]
    assert results[0].reason == f"--on host needs a usable KVM on this host; the probe says: " \
                                f"{facts.accel_reason}"
    assert results[1].reason.startswith("build failed: ")


def test_host_runner_maps_each_ending_and_kills_a_hang(fake_build: SelftestBuild, tmp_path: Path):
    facts = host("amd-kvm")  # recorded facts of a KVM host: the fakes need no KVM to run
    seen = []
    results = st.run_on_host(_plan(fake_build, ("sleeper", "passer", "skipper", "failer"), 1.5,
                                   "host"), facts, tmp_path, done=seen.append)
    by = {r.params["test"]: r for r in results}
    assert [r.id for r in seen] == [r.id for r in results]
    hang = by["sleeper"]
    assert (hang.verdict, hang.reason, hang.metrics["timed_out"]) == ("fail", "timeout after 1.5 s", True)
    # proc.reap ends the process group with SIGTERM, then SIGKILL if it lingers.
    assert hang.metrics["timeout_s"] == 1.5 and hang.metrics["exit_code"] in (137, 143)
    assert by["passer"].verdict == "pass"
    assert (by["skipper"].verdict, by["skipper"].reason) == ("skip", "Requirement not met: fake_feature()")
    assert by["failer"].verdict == "fail"
    assert by["failer"].reason == "exit 254: failer.c:7: ret == 0: KVM_RUN failed, rc: -1"
    out = Path(by["passer"].artifacts["output"])
    assert out.read_text() == "ok 1 passer\n" and Path(by["passer"].artifacts["dmesg"]).exists()


def test_profile_the_host_cannot_offer_skips_every_runnable_test(fake_build: SelftestBuild,
                                                                tmp_path: Path):
    from harness.guest.image import GuestTools, L1Image
    from harness.guest.kernel import Kernel
    from harness.host.enlightenments import resolve_profile

    facts = host("tcg-debian12")
    profile = resolve_profile(None, "hv-relaxed", l1_nested=facts.l1_nested, vendor=facts.vendor)
    image = L1Image(Kernel(tmp_path, tmp_path, "x", "test"), tmp_path / "none.cpio", "k",
                    GuestTools(tmp_path, "t"), ())
    plan = st.SelftestPlan(fake_build, ("passer", "broken_test"), 5, "l1", profile)
    results = st.run_in_l1(plan, RunContext(host=facts, image=image, out=tmp_path))
    assert [r.verdict for r in results] == ["skip", "error"]
    assert "need -accel kvm" in results[0].reason


# -- the command line -----------------------------------------------------------------------

# The environment before any test moved NESTVIRT_CACHE: the CLI keeps the machine's cache
# (its L1 kernel and image) while a fake build sits in a test's own cache.
_ENV = dict(os.environ)


def nestvirt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=_ENV)


@pytest.mark.parametrize("args,needle", [
    (["selftest", "--kernel-tree", "/nonexistent", "--list"], "no tools/testing/selftests/kvm"),
    (["selftest", "--selftests", "/nonexistent"], "not a directory"),
    (["selftest", "--timeout", "0"], "--timeout 0"),
    (["selftest", "--kernel-tree", "/a", "--selftests", "/b"], "not allowed with argument"),
    (["selftest", "--on", "moon"], "invalid choice"),
])
def test_selftest_bad_input_is_one_line_and_exit_2(args: list[str], needle: str):
    cp = nestvirt(*args)
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], cp.stderr


def test_selftest_unknown_filter_is_exit_2(fake_build: SelftestBuild):
    cp = nestvirt("selftest", "--selftests", str(fake_build.dir / "bin"), "--filter", "passer,nope*")
    assert cp.returncode == 2 and "--filter nope*: no such selftest" in cp.stderr, cp.stderr


def test_selftest_on_host_here_writes_every_view(fake_build: SelftestBuild, tmp_path: Path,
                                                 facts: HostFacts):
    out = tmp_path / "out"
    cp = nestvirt("selftest", "--selftests", str(fake_build.dir / "bin"), "--on", "host",
                  "--filter", "passer,skipper", "--timeout", "5", "--out", str(out))
    doc = json.loads((out / "results.json").read_text())
    verdicts = {s["id"]: s["verdict"] for s in doc["scenarios"]}
    assert set(verdicts) == {"selftest/passer", "selftest/skipper"}
    if facts.accel != "kvm":
        assert cp.returncode == 0 and set(verdicts.values()) == {"skip"}
        assert "--on host needs a usable KVM" in cp.stderr
    else:
        assert verdicts == {"selftest/passer": "pass", "selftest/skipper": "skip"}
    assert (out / "results.tap").read_text().startswith("TAP version 13\n1..2\n")
    assert ET.parse(out / "junit.xml").getroot().get("tests") == "2"
    assert doc["run"]["selftests"]["source"].startswith("prebuilt:")


# -- real runs in L1 (QEMU; TCG here) --------------------------------------------------------

@pytest.mark.qemu
def test_timeout_in_l1_kills_the_test_and_l1_runs_on(ctx: RunContext,
                                                     fake_in_l1: SelftestBuild):
    plan = st.SelftestPlan(fake_in_l1, ("sleeper", "passer", "skipper", "failer", "broken_test"), 3.0)
    results = st.run_in_l1(plan, ctx)
    by = {r.params["test"]: r for r in results}
    hang = by["sleeper"]
    assert (hang.verdict, hang.reason) == ("fail", "timeout after 3 s"), hang.reason
    assert hang.metrics["timed_out"] and hang.metrics["timeout_s"] == 3.0
    # The in-guest deadline killed it (SIGKILL, 137); L1 itself kept answering.
    assert hang.metrics["exit_code"] == 137 and "l1_unresponsive" not in hang.metrics
    assert 3.0 <= hang.metrics["seconds"] < 3.0 + st.RUNNER_GRACE_S
    assert by["passer"].verdict == "pass" and by["passer"].metrics["l1_boot"] == 1
    assert by["skipper"].reason == "Requirement not met: fake_feature()"
    assert by["failer"].reason == "exit 254: failer.c:7: ret == 0: KVM_RUN failed, rc: -1"
    assert by["broken_test"].verdict == "error"
    assert Path(by["passer"].artifacts["output"]).read_text() == "ok 1 passer\n"
    assert (ctx.out / "l1" / "l1-console.log").exists()
    # No bound on the whole run's wall time (a shared machine makes it noise): the hang's
    # own seconds above show the in-guest deadline, not the run's end, stopped it.


@pytest.mark.qemu
def test_an_l1_that_stops_answering_is_a_timeout_and_is_replaced(ctx: RunContext,
                                                                 fake_in_l1: SelftestBuild):
    plan = st.SelftestPlan(fake_in_l1, ("wedger", "passer"), 3.0)
    wedged, after = st.run_in_l1(plan, ctx)
    assert (wedged.verdict, wedged.reason) == ("fail", "timeout after 3 s"), wedged.reason
    assert wedged.metrics["l1_unresponsive"] and wedged.metrics["exit_code"] is None
    assert wedged.metrics["l1_boot"] == 1
    assert (Path(wedged.artifacts["dir"]) / "l1-registers.txt").read_text().strip()
    assert "L1 stopped answering" in Path(wedged.artifacts["dmesg"]).read_text()
    # A fresh L1 ran the next test: the tests copied into it again, from the same image.
    assert after.verdict == "pass" and after.metrics["l1_boot"] == 2
    assert (ctx.out / "l1" / "l1-boot2-console.log").exists()
    first, second = wedged.metrics["l1_start"], after.metrics["l1_start"]
    assert first["tests"]["bytes"] == second["tests"]["bytes"] > 0
    if first["start"] == "snapshot":
        assert second["image"] == first["image"] and not second["built"]


@pytest.mark.qemu
def test_a_kernel_that_panics_during_a_test_fails_it_with_the_panic(ctx: RunContext,
                                                                    fake_in_l1: SelftestBuild):
    # A panic ends L1's QEMU with status 0 and no stderr (-no-reboot): the console is the witness.
    plan = st.SelftestPlan(fake_in_l1, ("panicker", "passer"), 10.0)
    crashed, after = st.run_in_l1(plan, ctx)
    assert crashed.verdict == "fail", crashed.reason
    assert crashed.reason.startswith("L1 died during the test: status 0, no stderr")
    assert "Kernel panic - not syncing: sysrq triggered crash" in crashed.reason
    assert crashed.metrics["l1_exited"] and crashed.metrics["exit_code"] is None
    assert "sysrq triggered crash" in Path(crashed.artifacts["dmesg"]).read_text()
    assert after.verdict == "pass" and after.metrics["l1_boot"] == 2


@pytest.fixture(scope="session")
def debian_build() -> SelftestBuild:
    """Debian's linux-source matching the default kernel, built once per machine (cached)."""
    from harness.guest.kernel import find_kernel

    return st.resolve_build(find_kernel(), None, None, lambda line: None)


@pytest.mark.qemu
def test_named_set_from_debian_tree_in_l1(debian_build: SelftestBuild, facts: HostFacts,
                                          tmp_path: Path):
    assert debian_build.get("dirty_log_test").error, "dirty_log_test built: the tree changed?"
    out = tmp_path / "out"
    # The subprocess bound is the only time limit: each test's own is judged below.
    cp = nestvirt("selftest", "--filter", ",".join(NAMED), "--timeout", "8", "--out", str(out),
                  timeout=300)
    doc = json.loads((out / "results.json").read_text())
    by = {s["params"]["test"]: s for s in doc["scenarios"]}
    assert set(by) == set(NAMED), cp.stderr
    for name, r in by.items():
        rc = r["metrics"].get("exit_code")
        if r["metrics"].get("timed_out"):
            assert (r["verdict"], r["reason"]) == ("fail", "timeout after 8 s")
        elif name == "dirty_log_test":
            assert r["verdict"] == "error" and "undefined reference to `TEST_ASSERT_EQ'" in r["reason"]
        else:
            # Truthful mapping: the verdict is what the test's own exit status says.
            assert r["verdict"] == {0: "pass", 4: "skip"}.get(rc, "fail"), (name, r)
            assert Path(r["artifacts"]["output"]).exists()
    if facts.l1_nested == "svm":
        for vmx_only in ("evmcs_test", "vmx_set_nested_state_test"):
            assert by[vmx_only]["verdict"] == "skip"
            assert by[vmx_only]["reason"] == "Requirement not met: kvm_cpu_has(X86_FEATURE_VMX)"
    if facts.accel == "tcg":  # 512 create/destroy rounds with many vCPUs: minutes under TCG
        assert by["hardware_disable_test"]["metrics"]["timed_out"]
    assert cp.returncode == 1  # dirty_log_test's build error
    tap_lines = (out / "results.tap").read_text().splitlines()
    assert tap_lines[:2] == ["TAP version 13", f"1..{len(NAMED)}"]
    assert ET.parse(out / "junit.xml").getroot().get("tests") == str(len(NAMED))
