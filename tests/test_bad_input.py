"""Bad input, each through the CLI as a user types it: one line on stderr, exit 2, no
traceback, and no QEMU of that run left (none of these should even start one for a run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core import proc

REPO = Path(__file__).resolve().parent.parent


def qemus_of(pid: int, out: Path) -> list[int]:
    """Live QEMUs of that CLI: its probe's (the socket dir names its pid) or its run's."""
    needles = (f"nestvirt-probe-{pid}-".encode(), str(out).encode())
    return [q for q, argv in proc.qemu_processes()
            if any(n in a for a in argv for n in needles) and proc.pid_alive(q)]


def bad(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
        out: Path | None = None) -> str:
    """Run the CLI; assert the bad-input contract; return its one stderr line."""
    out = out or tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "harness", *args, "--out", str(out)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    _, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    # The probe's warning about emulation is a warning, not part of the refusal.
    lines = [ln for ln in lines if not ln.startswith("nestvirt: accel ")]
    assert p.returncode == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("nestvirt: error: "), err
    assert not qemus_of(p.pid, out)
    return lines[0]


def write(tmp_path: Path, name: str, text: str) -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


MATRIX_HEAD = "nestvirt_matrix: 1\nname: t\n"


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path):
    f = write(tmp_path, "m.yaml", MATRIX_HEAD + "include:\n  - scenario: migrate-plain\n"
                                                "    compression: [none]]\n"
                                                "  - scenario: migrate-bare\n")
    line = bad(tmp_path, "run", "--matrix", str(f))
    assert f"matrix {f}:5: not YAML" in line


def test_an_unknown_axis_names_the_file_line_and_key(tmp_path: Path):
    f = write(tmp_path, "m.yaml", MATRIX_HEAD + "include:\n  - scenario: [migrate-plain]\n"
                                                "    compresion: [none]\n")
    line = bad(tmp_path, "run", "--matrix", str(f))
    assert f"matrix {f}: include[0] (line 5): unknown axis 'compresion'" in line


def test_an_unknown_top_level_key_names_its_line(tmp_path: Path):
    f = write(tmp_path, "m.yaml", MATRIX_HEAD + "inclde: []\n")
    assert f"matrix {f} (line 3): unknown top-level key 'inclde'" in bad(tmp_path, "run",
                                                                            "--matrix", str(f))


def test_a_bad_value_in_a_matrix_names_its_line(tmp_path: Path):
    f = write(tmp_path, "m.yaml", MATRIX_HEAD + "include:\n  - scenario: migrate-plain\n"
                                                "    channels: -2\n")
    assert "(line 5): channels=-2: expected a positive integer" in bad(tmp_path, "run",
                                                                         "--matrix", str(f))


def test_an_unknown_key_in_the_qemu_config_names_file_line_and_key(tmp_path: Path):
    conf = tmp_path / "xdg" / "nestvirt"
    conf.mkdir(parents=True)
    f = write(conf, "qemu.yaml", "qemu:\n  - binary: /usr/bin/qemu-system-x86_64\n"
                                 "    modules: /x\n")
    line = bad(tmp_path, "run", "migrate-plain", env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert f"QEMU config {f} (line 3): qemu[0]: unknown key 'modules'" in line


@pytest.mark.parametrize("args,said", [
    (["--hv", "hv-nope"], "unknown Hyper-V flag hv-nope"),
    (["--profile", "nope"], "unknown enlightenment profile 'nope'"),
    (["--repeat", "0"], "--repeat must be at least 1 (got 0)"),
    (["--repeat", "-3"], "--repeat must be at least 1 (got -3)"),
    (["--compression", "xbzrle", "--xbzrle-cache-mib", "0"], "--xbzrle-cache-mib 0: must be a "
                                                              "power of two"),
    (["--compression", "xbzrle", "--xbzrle-cache-mib", "48"], "--xbzrle-cache-mib 48"),
    (["--channels", "-1"], "--channels and --threads must be at least 1"),
    (["--decompress-threads", "0"], "must be at least 1"),
    (["--max-bandwidth-mib", "-1"], "--max-bandwidth-mib -1 is negative"),
    (["--downtime-limit-ms", "0"], "--downtime-limit-ms 0 is not in 1..2000000"),
    (["--compression", "multifd-zstd", "--level", "99"], "--level 99 is not valid"),
    (["-j", "-1"], "-j must be 0"),
    (["--stall-timeout", "0"], "--stall-timeout 0: must be more than 0"),
    (["--guest-mode-retries", "-1"], "--guest-mode-retries must be 0 or more"),
    (["--inject", "nope"], "invalid choice: 'nope'"),
    (["--modules", "/nonexistent"], "--modules goes with --kernel"),
])
def test_bad_options_are_refused_before_anything_starts(tmp_path: Path, args: list[str],
                                                        said: str):
    assert said in bad(tmp_path, "run", "migrate-plain", *args)


def test_a_kernel_that_is_not_a_kernel(tmp_path: Path):
    f = write(tmp_path, "vmlinuz-1.0", "#!/bin/sh\necho I am a script\n")
    line = bad(tmp_path, "run", "migrate-plain", "--kernel", str(f))
    assert f"{f} is not a Linux kernel image (no bzImage 'HdrS' header" in line


def test_a_module_tree_without_kvm(tmp_path: Path):
    k = tmp_path / "vmlinuz-9.9"
    k.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    mods = tmp_path / "mods"
    (mods / "kernel" / "drivers").mkdir(parents=True)
    line = bad(tmp_path, "run", "migrate-plain", "--kernel", str(k), "--modules", str(mods))
    assert f"module tree {mods} has no kvm module" in line
    assert "not a module tree" in bad(tmp_path, "run", "migrate-plain", "--kernel", str(k),
                                      "--modules", str(tmp_path))


@pytest.mark.qemu
def test_a_qemu_too_old_for_the_asked_mode_names_binary_and_capability(tmp_path: Path, facts):
    new = [q for q in (facts.qemu, *facts.qemus) if not q.legacy_compress]
    if not new:
        pytest.skip("no QEMU without legacy compress here (9.1+): `nestvirt qemu fetch`")
    q = new[0]
    line = bad(tmp_path, "run", "migrate-plain", "--compression", "compress", "--qemu", q.binary)
    assert f"--compression compress on {q.binary}: legacy compress is absent" in line
    assert f"QEMU {q.version}" in line


def mount_tmpfs(mnt: Path, opts: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt.mkdir()
    proc.run(["mount", "-t", "tmpfs", "-o", opts, "nestvirt-test", str(mnt)], 10)


def test_out_on_a_read_only_disk(tmp_path: Path):
    mnt = tmp_path / "ro"
    mount_tmpfs(mnt, "size=1m,ro")
    try:
        line = bad(tmp_path, "run", "migrate-plain", out=mnt / "out")
    finally:
        proc.run(["umount", "-l", str(mnt)], 10, check=False)
    assert f"--out {mnt / 'out'}: not writable (Read-only file system)" in line


def test_out_on_a_full_disk(tmp_path: Path):
    mnt = tmp_path / "full"
    mount_tmpfs(mnt, "size=8m")
    try:
        (mnt / "out").mkdir()
        line = bad(tmp_path, "run", "migrate-plain", out=mnt / "out")
    finally:
        proc.run(["umount", "-l", str(mnt)], 10, check=False)
    assert f"--out {mnt / 'out'}: only" in line and "MiB free" in line


def test_a_module_whose_dependency_is_missing_is_named(tmp_path: Path):
    from harness.core.errors import SetupError
    from harness.guest.image import module_load_order

    tree = tmp_path / "6.1.0-test"
    (tree / "kernel" / "arch").mkdir(parents=True)
    (tree / "kernel" / "arch" / "kvm-amd.ko").write_bytes(b"\0depends=kvm\0")
    (tree / "kernel" / "arch" / "kvm.ko").write_bytes(b"\0depends=irqbypass\0")
    with pytest.raises(SetupError, match=r"module kvm needs irqbypass, which is not in"):
        module_load_order(tree)
    (tree / "kernel" / "arch" / "irqbypass.ko").write_bytes(b"\0depends=\0")
    assert module_load_order(tree) == ["irqbypass", "kvm", "kvm_amd"]


@pytest.mark.parametrize("args,said", [
    (["vmexit", "--repeat", "0"], "--repeat 0: need at least 1"),
    (["vmexit", "--profile", "nope"], "unknown enlightenment profile 'nope'"),
    (["bench", "compression", "--repeat", "0"], "--repeat and --threads must be at least 1"),
    (["bench", "compression", "--threads", "x"], "not a comma-separated list of integers: x"),
    (["hostvm", "boot", "--hostvm-mem", "10"], "--hostvm-mem 10: the host VM needs at least"),
    (["selftest", "--on", "mars"], "invalid choice: 'mars'"),
])
def test_other_commands_refuse_bad_options_the_same_way(tmp_path: Path, args: list[str],
                                                        said: str):
    assert said in bad(tmp_path, *args)


@pytest.mark.parametrize("args,said", [
    (["report", "/nonexistent/results.json"], "not a nestvirt results.json"),
    (["matrix", "/etc/hostname"], "expected a mapping at the top"),
    (["qemu", "list", "--qemu", "/nonexistent/qemu"], "--qemu /nonexistent/qemu: no such file"),
    (["doctor", "--qemu", "/bin/true"], "not a QEMU"),
])
def test_commands_without_out_refuse_bad_input_the_same_way(tmp_path: Path, args: list[str],
                                                            said: str):
    p = subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("nestvirt: error: ") and said in lines[0], p.stderr


def test_a_disk_error_outside_plain_run_is_one_line(monkeypatch, capsys):
    import errno

    from harness.runners import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/full/out/results.json")

    monkeypatch.setattr(cli, "cmd_report", full)
    assert cli.main(["report", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nestvirt: error: out of disk: writing /full/out/results.json failed: "
                   "No space left on device"]
    # Any other OSError is a bug and keeps its traceback.
    monkeypatch.setattr(cli, "cmd_report", lambda a: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError):
        cli.main(["report", "x"])


@pytest.mark.parametrize("value", ["slow", "0.5", "50"])
def test_a_bad_timeout_scale_is_refused_before_anything_starts(tmp_path: Path, value: str):
    line = bad(tmp_path, "run", "migrate-plain", env={"NESTVIRT_TIMEOUT_SCALE": value})
    assert "NESTVIRT_TIMEOUT_SCALE" in line and value in line
