"""Compression modes map onto QEMU's names and gate on the recorded QMP schema."""

from __future__ import annotations

import json

import pytest

from harness.core.errors import UsageError
from harness.host.probe import HostFacts
from harness.vm.migration import COMPRESSION_MODES, MigrationMode, summarize_stats

from .conftest import DATA


def _host(name: str) -> HostFacts:
    return HostFacts.from_json(json.loads((DATA / "hosts" / f"{name}.json").read_text()))


def test_capabilities_and_parameters():
    z = MigrationMode("multifd-zstd", channels=4, level=3)
    assert z.capabilities() == {"events": True, "multifd": True}
    p = z.parameters("src")
    assert p["multifd-channels"] == 4 and p["multifd-compression"] == "zstd"
    assert p["multifd-zstd-level"] == 3
    c = MigrationMode("compress", threads=3, decompress_threads=1, level=9, wait_thread=False)
    assert c.capabilities()["compress"]
    pc = c.parameters("dst")
    assert (pc["compress-threads"], pc["decompress-threads"], pc["compress-level"],
            pc["compress-wait-thread"]) == (3, 1, 9, False)
    x = MigrationMode("xbzrle", xbzrle_cache_mib=32)
    assert x.parameters("src")["xbzrle-cache-size"] == 32 << 20
    assert MigrationMode("none").capabilities() == {"events": True}
    assert "downtime-limit" not in MigrationMode("none").parameters("src")  # QEMU's default kept
    assert MigrationMode("xbzrle", downtime_limit_ms=1000).parameters("src")["downtime-limit"] == 1000
    # auto-converge is a capability of its own, beside any mode's
    ac = MigrationMode("multifd-zlib", auto_converge=True).capabilities()
    assert ac == {"events": True, "multifd": True, "auto-converge": True}
    assert "auto-converge" not in MigrationMode("multifd-zlib").capabilities()


def test_auto_converge_is_a_matrix_axis_and_names_its_variant():
    from harness.matrix.files import expand_matrix, parse_matrix

    host = HostFacts.from_json(json.loads((DATA / "hosts" / "tcg-debian12.json").read_text()))
    plan = expand_matrix(parse_matrix({"nestvirt_matrix": 1, "name": "ac", "include": [
        {"scenario": "migrate-nested", "compression": "multifd-zlib",
         "auto_converge": [False, True]}]}, "ac.yaml"), host)
    assert [p.id for p in plan.variants] == ["migrate-nested/multifd-zlib",
                                             "migrate-nested/multifd-zlib+auto_converge=on"]
    assert plan.variants[1].variant.mode.capabilities()["auto-converge"]
    with pytest.raises(UsageError, match="auto_converge"):
        parse_matrix({"nestvirt_matrix": 1, "name": "ac", "include": [
            {"scenario": "migrate-nested", "auto_converge": "yes"}]}, "ac.yaml")


@pytest.mark.parametrize("kw", [{"compression": "gzip"}, {"compression": "multifd-zlib", "level": 12},
                                {"compression": "none", "level": 1}, {"channels": 0},
                                {"transport": "rdma"}, {"downtime_limit_ms": 0}])
def test_bad_knobs_are_usage_errors(kw):
    with pytest.raises(UsageError):
        MigrationMode(**kw)


def test_schema_gating_on_recorded_hosts():
    here, intel, amd = _host("tcg-debian12"), _host("intel-kvm-evmcs"), _host("amd-kvm")
    for mode in COMPRESSION_MODES:
        assert MigrationMode(mode).unsupported_reason(here.qemu) is None, mode
    # QEMU 9.1+ dropped legacy compress: a skip with the reason, never a run.
    why = MigrationMode("compress").unsupported_reason(intel.qemu)
    assert why and "removed" in why
    assert MigrationMode("compress").unsupported_reason(amd.qemu) is None


def test_summarize_stats_flattens_query_migrate():
    info = {"status": "completed", "total-time": 700, "downtime": 12, "setup-time": 3,
            "ram": {"transferred": 10, "mbps": 900.5, "pages-per-second": 4000, "multifd-bytes": 9},
            "compression": {"pages": 5, "compression-rate": 2.5}}
    s = summarize_stats(info)
    assert s["total_time_ms"] == 700 and s["downtime_ms"] == 12
    assert s["ram_pages_per_second"] == 4000 and s["ram_multifd_bytes"] == 9
    assert s["compression_compression_rate"] == 2.5


def test_a_timed_out_migration_says_the_sources_own_failure_line():
    """A source that printed why (CI, 2026-12-03: its RAM save -EIO, then no terminal state)
    has that line in the timeout's detail; one that printed no failure adds nothing."""
    import time

    from harness.core.errors import StepTimeout
    from harness.vm import migration

    class Source:  # only what _wait_end asks of a Machine: a pure-logic stand-in
        def __init__(self, failures: list[str]):
            self.failures, self.cancelled = failures, False

        def wait_qmp_event(self, names, timeout, match=None):
            raise StepTimeout("no event")

        def alive(self) -> bool:
            return True

        def qmp(self, command: str, **args):
            self.cancelled = command == "migrate_cancel"

        def failure_lines(self) -> list[str]:
            return self.failures

    line = "qemu-system-x86_64: failed to save SaveStateEntry with id(name): 2(ram): -5"
    src = Source(["qemu-system-x86_64: an earlier failure", line])
    status, why, _ = migration._wait_end(src, time.monotonic() + 0.05, 240, None, {"completed"})
    assert status == "timeout" and src.cancelled
    assert why == f"src: no terminal migration state in 240s; src said: {line}"
    _, why, _ = migration._wait_end(Source([]), time.monotonic() + 0.05, 240, None,
                                    {"completed"})
    assert why == "src: no terminal migration state in 240s"
