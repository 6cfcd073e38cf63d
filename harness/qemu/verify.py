"""Verify one QEMU install by starting it, the way that shows a broken one.

Two short QEMUs, QMP over stdio, bounded and reaped (proc.run), nothing left running:

1. ``-machine none``: the QMP greeting's version, then ``qom-list-types`` of every concrete
   device, which loads every module the binary knows. A module dir of another build shows only
   here ("Only modules from the same build can be loaded", "undefined symbol", then an
   assertion abort): an L1 boot loads no module at all, so such an install boots fine and
   aborts later, the first time anything lists devices.
2. ``-machine q35,accel=tcg -S``: machine init loads the BIOS and option ROMs from the -L dirs
   and the compiled-in ones ("could not load PC BIOS 'bios-256k.bin'" when they are missing).

Pass: both exit 0, the same version in both greetings (and the expected one, when given), and
no stderr line but those saying a module's own library is missing ("failed to open module:
libvirglrenderer.so.1: cannot open shared object file"), which only that module needs: those
are warnings.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from harness.core import proc
from harness.core.errors import SetupError, StepTimeout
from harness.host.probe import firmware_args, launch_env

VERIFY_TIMEOUT_S = 30.0
_BENIGN = re.compile(r"failed to open module: lib[^/ ]+\.so[.0-9]*: cannot open shared object file")
_DEVICES = {"execute": "qom-list-types", "arguments": {"implements": "device", "abstract": False}}


@dataclass(frozen=True)
class Verification:
    """What starting an install showed. ``problems`` empty means it passed."""

    version: str
    device_types: int
    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def summary(self) -> str:
        """"ok" or the first problem, in one line."""
        return "ok" if self.ok else self.problems[0]


def verify(binary: str, *, module_dir: str = "", firmware_dirs: tuple[str, ...] = (),
           expect_version: str | None = None) -> Verification:
    """Start ``binary`` twice as the module docstring says and report what it showed."""
    base = [binary, *firmware_args(firmware_dirs)]
    common = ["-nodefaults", "-no-user-config", "-display", "none", "-qmp", "stdio"]
    env = launch_env(module_dir)
    runs = {
        "machine none": _qmp_stdio([*base, "-machine", "none", *common], env,
                                   [{"execute": "query-version"}, _DEVICES]),
        "q35": _qmp_stdio([*base, "-machine", "q35,accel=tcg", "-S", *common], env,
                          [{"execute": "query-version"}]),
    }
    problems: list[str] = []
    warnings: list[str] = []
    versions: list[str] = []
    device_types = 0
    for what, (rc, replies, stderr) in runs.items():
        for line in (ln.strip() for ln in stderr.splitlines()):
            if line:
                (warnings if _BENIGN.search(line) else problems).append(f"{what}: {line}")
        if rc != 0:
            problems.append(f"{what}: exit status {rc}" + (" (killed by a signal)" if rc < 0 else ""))
        greeting = next((r for r in replies if "QMP" in r), None)
        if greeting is None:
            problems.append(f"{what}: no QMP greeting: not a QEMU, or it died at start")
            continue
        v = greeting["QMP"]["version"]["qemu"]
        versions.append(f"{v['major']}.{v['minor']}.{v['micro']}")
        lists = [r["return"] for r in replies if isinstance(r.get("return"), list)]
        if what == "machine none":
            if lists:
                device_types = len(lists[0])
            else:
                problems.append("machine none: qom-list-types gave no answer")
    version = versions[0] if versions else ""
    if len(set(versions)) > 1:
        problems.append(f"two versions from one binary: {', '.join(versions)}")
    if expect_version and version and version != expect_version:
        problems.append(f"version {version}, expected {expect_version}")
    # The abort's cause comes first and its assertion line last: lead with the cause.
    problems.sort(key=lambda p: "exit status" in p or "Assertion" in p)
    return Verification(version, device_types, tuple(problems), tuple(warnings))


def _qmp_stdio(argv: list[str], env: dict[str, str],
               commands: list[dict]) -> tuple[int, list[dict], str]:
    """Run one QEMU with QMP on stdin/stdout: capabilities, ``commands``, quit."""
    script = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    text = "".join(json.dumps(c) + "\n" for c in script)
    try:
        cp = proc.run(argv, VERIFY_TIMEOUT_S, env=env, check=False, input=text)
    except StepTimeout:
        return 124, [], f"did not finish in {VERIFY_TIMEOUT_S:g}s"
    except SetupError as e:
        return 127, [], str(e)
    replies = []
    for line in cp.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict):
            replies.append(msg)
    return cp.returncode, replies, cp.stderr
