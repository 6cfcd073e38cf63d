"""Host probe: what this host and this QEMU binary can do, computed once and passed down.

``probe()`` is the only function here that touches the host. It reads /proc and /sys, asks
/dev/kvm through ``kvmcaps``, and starts QEMU at most twice (in parallel, each bounded and
always reaped): once under TCG with ``-machine none`` to read the QMP schema, and once with
``-accel kvm`` to see whether QEMU can really use KVM here. Everything below the probe works
on the returned ``HostFacts`` (or on one recorded with ``to_json``) and never re-probes.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from harness.core import scratch
from harness.core.errors import SetupError, StepTimeout, UsageError
from harness.core.proc import reap, signals_deferred, spawn
from harness.host import kvmcaps

ACCELS = ("auto", "kvm", "tcg")
QEMU_ENV = "NESTVIRT_QEMU"
QEMU_DEFAULT = "qemu-system-x86_64"

# The schema QEMU does no guest work; 10 s only matters on a badly overloaded CI machine.
SCHEMA_TIMEOUT_S = 10.0
# A QEMU that can use KVM answers QMP in well under a second; one that cannot aborts at once.
KVM_START_TIMEOUT_S = 5.0

# Tried in order for the hv-* property list; "max" exists in every QEMU with TCG.
_CPU_TYPENAMES = ("max-x86_64-cpu", "base-x86_64-cpu", "host-x86_64-cpu")

HvCpuidEntry = kvmcaps.HvCpuidEntry


@dataclass(frozen=True)
class KvmFacts:
    """/dev/kvm and the KVM module as seen from userspace.

    ``reason`` is "ok" or "unavailable: <first failing step>". ``caps`` has exactly the
    names in ``kvmcaps.CAP_NAMES``. ``module`` is "kvm_intel", "kvm_amd", another loaded
    kvm_* backend (e.g. "kvm_pvm"), "kvm" alone, or None when no KVM module is loaded.
    ``nested_param`` is the raw content of kvm_intel/kvm_amd's ``nested`` parameter
    ("Y", "N", "1", "0"), or None when that vendor module is not loaded.
    """

    device_ok: bool
    reason: str
    api_version: int | None
    caps: dict[str, bool]
    create_vm_ok: bool
    hv_cpuid: tuple[HvCpuidEntry, ...] | None
    module: str | None
    nested_param: str | None


@dataclass(frozen=True)
class QemuFacts:
    """One QEMU binary: version, the parts of its QMP schema the harness gates on, and
    whether it really starts with ``-accel kvm`` on this host.

    Gate features on these sets, never on ``version_tuple``: distributions backport and
    configure options drop things (e.g. multifd zstd needs CONFIG_ZSTD).
    ``accel_kvm_tried`` is False when the KVM start was skipped (TCG requested, or
    /dev/kvm already failed); ``accel_kvm_error`` then says why, and otherwise holds
    QEMU's own first error line ("" when KVM worked).
    """

    binary: str
    version: str
    version_tuple: tuple[int, int, int]
    package: str
    migration_capabilities: frozenset[str]
    migration_parameters: frozenset[str]
    multifd_compression: frozenset[str]
    legacy_compress: bool
    commands: frozenset[str]
    hv_props: frozenset[str]
    accel_kvm_tried: bool
    accel_kvm_ok: bool
    accel_kvm_error: str
    # How this binary is started and named (harness/qemu/inventory.py fills these in), and the
    # machine types it offers: versioned q35 types oldest first, and what plain "q35" means.
    name: str = ""
    origin: str = ""
    module_dir: str = ""  # QEMU_MODULE_DIR for this binary's processes only ("": none)
    firmware_dirs: tuple[str, ...] = ()  # -L dirs, searched before the compiled-in ones
    machine_types: tuple[str, ...] = ()
    default_machine: str = ""
    verified: str = ""  # "ok", or the verification's first problem ("": not verified)
    warnings: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How a person names this binary in one word: its inventory name, else its version."""
        return self.name or self.version

    def to_json(self) -> dict[str, Any]:
        return _encode_fields(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> QemuFacts:
        """Inverse of to_json; ValueError on unknown or missing keys (fields added later, with
        defaults, may be absent: records written before them still read)."""
        q = _checked(cls, d)
        major, minor, micro = q["version_tuple"]
        return cls(
            binary=str(q["binary"]),
            version=str(q["version"]),
            version_tuple=(int(major), int(minor), int(micro)),
            package=str(q["package"]),
            migration_capabilities=frozenset(q["migration_capabilities"]),
            migration_parameters=frozenset(q["migration_parameters"]),
            multifd_compression=frozenset(q["multifd_compression"]),
            legacy_compress=bool(q["legacy_compress"]),
            commands=frozenset(q["commands"]),
            hv_props=frozenset(q["hv_props"]),
            accel_kvm_tried=bool(q["accel_kvm_tried"]),
            accel_kvm_ok=bool(q["accel_kvm_ok"]),
            accel_kvm_error=str(q["accel_kvm_error"]),
            name=str(q.get("name", "")),
            origin=str(q.get("origin", "")),
            module_dir=str(q.get("module_dir", "")),
            firmware_dirs=tuple(str(x) for x in q.get("firmware_dirs", ())),
            machine_types=tuple(str(x) for x in q.get("machine_types", ())),
            default_machine=str(q.get("default_machine", "")),
            verified=str(q.get("verified", "")),
            warnings=tuple(str(x) for x in q.get("warnings", ())),
        )


@dataclass(frozen=True)
class HostFacts:
    """Everything later stages need to know about the host, and the accel decision.

    ``l1_cpu`` is the ``-cpu`` argument L1 gets and ``l1_nested`` the hardware
    virtualization L1 will see ("vmx" or "svm"); under TCG that is ``max``, which QEMU
    builds with SVM.
    """

    accel: str
    accel_reason: str
    vendor: str
    cpu_model: str
    cpu_flags_host_has_vmx: bool
    cpu_flags_host_has_svm: bool
    l1_cpu: str
    l1_nested: str
    host_kernel: str
    kvm: KvmFacts
    qemu: QemuFacts
    # Every QEMU binary of the inventory (qemu included), and the selector that pinned qemu as
    # the run's binary ("--qemu 7.2", "NESTVIRT_QEMU=/path"; "" when qemu is just the newest).
    qemus: tuple[QemuFacts, ...] = ()
    qemu_pin: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only: sets become sorted lists, tuples become lists."""
        out = _encode_fields(self, skip=("kvm", "qemu", "qemus"))
        out["kvm"] = _encode_fields(self.kvm)
        out["qemu"] = _encode_fields(self.qemu)
        out["qemus"] = [_encode_fields(q) for q in self.qemus]
        return out

    def binary(self, path: str) -> QemuFacts | None:
        """The facts of the inventory's binary at ``path`` (the run's own qemu included)."""
        for q in (self.qemu, *self.qemus):
            if q.binary == path:
                return q
        return None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HostFacts:
        """Inverse of ``to_json``; keys starting with "_" (notes) are ignored.

        Unknown or missing keys raise ValueError, so a stale fixture fails loudly.
        """
        top = _checked(cls, d)
        k = _checked(KvmFacts, top["kvm"])
        kvm = KvmFacts(
            device_ok=bool(k["device_ok"]),
            reason=str(k["reason"]),
            api_version=k["api_version"],
            caps={str(n): bool(v) for n, v in k["caps"].items()},
            create_vm_ok=bool(k["create_vm_ok"]),
            hv_cpuid=(None if k["hv_cpuid"] is None
                      else tuple(_hv_entry(e) for e in k["hv_cpuid"])),
            module=k["module"],
            nested_param=k["nested_param"],
        )
        qemu = QemuFacts.from_json(top["qemu"])
        qemus = tuple(QemuFacts.from_json(x) for x in top.get("qemus") or ())
        scalars = {f.name: top[f.name] for f in fields(cls)
                   if f.name not in ("kvm", "qemu", "qemus") and f.name in top}
        return cls(**scalars, kvm=kvm, qemu=qemu, qemus=qemus)


def _hv_entry(e: Iterable[int]) -> HvCpuidEntry:
    function, index, eax, ebx, ecx, edx = (int(x) for x in e)
    return (function, index, eax, ebx, ecx, edx)


def _encode(v: Any) -> Any:
    if isinstance(v, frozenset):
        return sorted(v)
    if isinstance(v, tuple):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    return v


def _encode_fields(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {f.name: _encode(getattr(obj, f.name)) for f in fields(obj) if f.name not in skip}


def _checked(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
    data = {k: v for k, v in d.items() if not k.startswith("_")}
    want = {f.name for f in fields(cls)}
    # A field with a default was added later: a record from before it still reads.
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing, extra = required - data.keys(), data.keys() - want
    if missing or extra:
        raise ValueError(
            f"{cls.__name__}: missing keys {sorted(missing)}, unknown keys {sorted(extra)}"
        )
    return data


# --------------------------------------------------------------------------------------
# probe()


def probe(accel: str = "auto", qemu_binary: str | None = None, *,
          qemu: QemuFacts | None = None, qemus: tuple[QemuFacts, ...] = (),
          qemu_pin: str = "") -> HostFacts:
    """Probe this host and QEMU binary once.

    ``accel``: "auto" picks kvm only if /dev/kvm opens, KVM_CREATE_VM works, QEMU really
    starts with ``-accel kvm`` and the host CPU shows vmx or svm (else L1 could not nest);
    otherwise tcg, with the reason in ``accel_reason``. "kvm" raises UsageError when any
    of that fails (never a silent fallback). "tcg" forces TCG.
    QEMU binary: ``qemu`` (facts already read by the inventory: only the KVM start is tried
    with it) > ``qemu_binary`` > $NESTVIRT_QEMU > qemu-system-x86_64 on PATH; SetupError when
    none is found or it cannot report its schema; StepTimeout if it never answers QMP.
    ``qemus`` and ``qemu_pin`` are recorded as given (the inventory, see HostFacts).
    Synchronous (runs its own event loop): do not call it from a coroutine.
    """
    if accel not in ACCELS:
        raise UsageError(f"--accel {accel}: expected one of {', '.join(ACCELS)}")
    binary = qemu.binary if qemu is not None else resolve_qemu(qemu_binary)
    env, fw = (launch_env(qemu.module_dir), qemu.firmware_dirs) if qemu else (None, ())
    cpu = _read_cpuinfo()
    kvm = _kvm_facts()

    skip_why = None
    if accel == "tcg":
        skip_why = "not tried: tcg requested"
    elif not kvm.device_ok or not kvm.create_vm_ok:
        skip_why = f"not tried: /dev/kvm {kvm.reason}"
    # A Ctrl-C inside qemu.qmp's asyncio session leaves it asserting in its cleanup (seen by
    # ci/kill_test.py): the signal waits the second or so the probe takes, then acts.
    with signals_deferred():
        schema, kvm_start = asyncio.run(_qemu_sessions(binary, try_kvm=skip_why is None,
                                                       schema=qemu is None, env=env,
                                                       firmware=fw))

    kvm_ok, kvm_error = (False, skip_why) if kvm_start is None else kvm_start
    if qemu is None:
        qemu = _qemu_facts(binary, schema, tried=kvm_start is not None, ok=kvm_ok, error=kvm_error)
    else:
        qemu = replace(qemu, accel_kvm_tried=kvm_start is not None, accel_kvm_ok=kvm_ok,
                       accel_kvm_error=kvm_error)
    qemus = tuple(qemu if q.binary == qemu.binary else q for q in qemus)

    has_vmx, has_svm = "vmx" in cpu.flags, "svm" in cpu.flags
    chosen, reason = decide_accel(accel, kvm, qemu, has_vmx=has_vmx, has_svm=has_svm)
    if chosen == "kvm":
        l1_nested = "vmx" if has_vmx else "svm"
        l1_cpu = f"host,+{l1_nested}"
    else:
        # QEMU's TCG "max" model implements SVM (with NPT), not VMX.
        l1_cpu, l1_nested = "max", "svm"
    return HostFacts(
        accel=chosen, accel_reason=reason, vendor=cpu.vendor, cpu_model=cpu.model,
        cpu_flags_host_has_vmx=has_vmx, cpu_flags_host_has_svm=has_svm,
        l1_cpu=l1_cpu, l1_nested=l1_nested, host_kernel=os.uname().release,
        kvm=kvm, qemu=qemu, qemus=qemus, qemu_pin=qemu_pin,
    )


def probe_schema(binary: str, *, module_dir: str = "",
                 firmware_dirs: tuple[str, ...] = ()) -> QemuFacts:
    """One QEMU binary's schema facts (no KVM start: ``accel_kvm_tried`` is False).

    Starts one ``-machine none`` QEMU, bounded and reaped; SetupError when it cannot report
    its schema (not a QEMU, or it dies), StepTimeout when it never answers.
    """
    with signals_deferred():
        schema, _ = asyncio.run(_qemu_sessions(binary, try_kvm=False, schema=True,
                                               env=launch_env(module_dir),
                                               firmware=firmware_dirs))
    return replace(_qemu_facts(binary, schema, tried=False, ok=False,
                               error="not tried: schema probe only"),
                   module_dir=module_dir, firmware_dirs=tuple(firmware_dirs))


def launch_env(module_dir: str) -> dict[str, str]:
    """The environment of one QEMU process: QEMU_MODULE_DIR set only for the binary it belongs
    to. An inherited one is dropped: a 7.2 QEMU that loads 10.0's modules aborts (and the other
    way round), and such a mismatch stays hidden until something makes QEMU load every module."""
    env = {k: v for k, v in os.environ.items() if k != "QEMU_MODULE_DIR"}
    if module_dir:
        env["QEMU_MODULE_DIR"] = module_dir
    return env


def firmware_args(firmware_dirs: Iterable[str]) -> list[str]:
    """``-L DIR`` per firmware dir: searched before the binary's compiled-in dirs."""
    return [x for d in firmware_dirs for x in ("-L", d)]


def warn_if_emulated(facts: HostFacts) -> None:
    """One stderr line when a run will be emulated: loud on purpose, since a nested run (or an
    exit cost) silently measured under TCG is the trap this prevents."""
    if facts.accel != "kvm":
        print(f"nestvirt: accel {facts.accel}: {facts.accel_reason}", file=sys.stderr)


def decide_accel(
    requested: str, kvm: KvmFacts, qemu: QemuFacts, *, has_vmx: bool, has_svm: bool
) -> tuple[str, str]:
    """Return (accel, one-line reason); raise UsageError if "kvm" was asked and can't be had.

    Pure: it only reads facts, so it can be tested on recorded hosts.
    """
    if requested == "tcg":
        return "tcg", "tcg: requested"
    if not kvm.device_ok:
        why = f"/dev/kvm {kvm.reason}"
    elif not kvm.create_vm_ok:
        why = f"/dev/kvm opens but {kvm.reason.removeprefix('unavailable: ')}"
    elif not qemu.accel_kvm_ok:
        why = ("/dev/kvm opens and KVM_CREATE_VM works, but QEMU -accel kvm fails: "
               f"{qemu.accel_kvm_error}")
    elif not (has_vmx or has_svm):
        why = "QEMU runs with KVM, but the host CPU has neither vmx nor svm, so L1 cannot nest"
    else:
        nested = "vmx" if has_vmx else "svm"
        return "kvm", (f"kvm: /dev/kvm opens, KVM_CREATE_VM works and QEMU starts with "
                       f"-accel kvm; L1 gets host,+{nested}")
    if requested == "kvm":
        raise UsageError(f"--accel kvm: {why}")
    return "tcg", f"tcg: {why}"


def resolve_qemu(qemu_binary: str | None = None) -> str:
    """Absolute path of the QEMU to use: argument > $NESTVIRT_QEMU > PATH; SetupError if none."""
    if qemu_binary:
        name, source = qemu_binary, "given"
    elif os.environ.get(QEMU_ENV):
        name, source = os.environ[QEMU_ENV], f"${QEMU_ENV}"
    else:
        name, source = QEMU_DEFAULT, "PATH"
    found = shutil.which(name)
    if found is None:
        raise SetupError(
            f"QEMU not found: {name} ({source}); install qemu-system-x86 "
            f"or set {QEMU_ENV}=/path/to/qemu-system-x86_64"
        )
    return os.path.abspath(found)


# --------------------------------------------------------------------------------------
# Host: /proc and /sys


@dataclass(frozen=True)
class _Cpu:
    vendor: str
    model: str
    flags: frozenset[str]


_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


def _read_cpuinfo(path: str = "/proc/cpuinfo") -> _Cpu:
    fields_: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return _Cpu("other", "", frozenset())
    # The first processor block is enough: the harness does not support mixed-vendor hosts.
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields_.setdefault(key.strip(), value.strip())
    return _Cpu(
        vendor=_VENDORS.get(fields_.get("vendor_id", ""), "other"),
        model=fields_.get("model name", ""),
        flags=frozenset(fields_.get("flags", "").split()),
    )


def _kvm_facts(sys_module: str = "/sys/module") -> KvmFacts:
    dev = kvmcaps.read_kvm()
    module, nested = _kvm_module(Path(sys_module))
    return KvmFacts(
        device_ok=dev.ok, reason=dev.reason, api_version=dev.api_version, caps=dev.caps,
        create_vm_ok=dev.create_vm_ok, hv_cpuid=dev.hv_cpuid, module=module,
        nested_param=nested,
    )


def _kvm_module(sys_module: Path) -> tuple[str | None, str | None]:
    for vendor_module in ("kvm_intel", "kvm_amd"):
        if (sys_module / vendor_module).is_dir():
            try:
                nested = (sys_module / vendor_module / "parameters" / "nested").read_text()
            except OSError:
                return vendor_module, None
            return vendor_module, nested.strip()
    try:
        others = sorted(p.name for p in sys_module.iterdir() if p.name.startswith("kvm_"))
    except OSError:
        others = []
    if others:
        return others[0], None
    return ("kvm" if (sys_module / "kvm").is_dir() else None), None


# --------------------------------------------------------------------------------------
# QEMU: two short-lived processes talking QMP

_T = TypeVar("_T")


class _SessionFailed(Exception):
    """QEMU exited or never answered QMP; the message is the best one-line reason."""


async def _qemu_sessions(
    binary: str, *, try_kvm: bool, schema: bool = True, env: dict[str, str] | None = None,
    firmware: tuple[str, ...] = (),
) -> tuple[dict[str, Any], tuple[bool, str] | None]:
    """Run the schema QEMU and (optionally) the KVM QEMU side by side."""
    # The pid in the name says whose probe a QEMU belongs to (ps shows the socket path).
    with scratch.private_root(f"nestvirt-probe-{os.getpid()}-") as tmp:
        fw = firmware_args(firmware)
        schema_args = [*fw, "-machine", "none", "-accel", "tcg"]
        kvm_args = [*fw, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-S"]

        async def no_schema() -> dict[str, Any]:
            return {}

        jobs: list[Awaitable[Any]] = [
            _with_qemu(binary, schema_args, _read_schema, SCHEMA_TIMEOUT_S, tmp, "schema", env)
            if schema else no_schema()
        ]
        if try_kvm:
            jobs.append(
                _with_qemu(binary, kvm_args, _query_kvm, KVM_START_TIMEOUT_S, tmp, "kvm", env)
            )
        # return_exceptions: a failing schema QEMU must not cancel the KVM one mid-reap.
        results = await asyncio.gather(*jobs, return_exceptions=True)

    schema_answers = results[0]
    if isinstance(schema_answers, _SessionFailed):
        raise SetupError(f"{binary} cannot report its QMP schema: {schema_answers}")
    if isinstance(schema_answers, asyncio.TimeoutError):
        raise StepTimeout(f"{binary} did not answer QMP within {SCHEMA_TIMEOUT_S:g}s")
    if isinstance(schema_answers, BaseException):
        raise schema_answers

    kvm_start: tuple[bool, str] | None = None
    if try_kvm:
        outcome = results[1]
        if isinstance(outcome, _SessionFailed):
            kvm_start = (False, str(outcome))
        elif isinstance(outcome, asyncio.TimeoutError):
            kvm_start = (False, f"QMP did not answer within {KVM_START_TIMEOUT_S:g}s")
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            kvm_start = outcome
    return schema_answers, kvm_start


async def _with_qemu(
    binary: str,
    args: list[str],
    body: Callable[[QMPClient], Awaitable[_T]],
    timeout: float,
    tmp: str,
    tag: str,
    env: dict[str, str] | None = None,
) -> _T:
    """Start QEMU with a QMP socket, run ``body`` on a connected client, quit, reap.

    Raises _SessionFailed (with QEMU's first error line) if QEMU exits or drops QMP, and
    asyncio.TimeoutError past ``timeout``. QEMU is reaped on every path.
    """
    sock = os.path.join(tmp, f"{tag}.qmp")
    err_path = os.path.join(tmp, f"{tag}.stderr")
    argv = [binary, *args, "-nodefaults", "-no-user-config", "-display", "none",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    # stderr to a file, not a pipe: nobody reads it while QEMU runs, so a pipe could fill.
    with open(err_path, "wb") as err:
        p = spawn(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        return await asyncio.wait_for(_session(p, sock, body), timeout)
    except _SessionFailed as e:
        failure = str(e)
    finally:
        reap(p, grace=2.0)
    # Read stderr only after reaping, so a dying QEMU has finished writing it.
    raise _SessionFailed(_first_error(err_path, binary) or failure)


async def _session(
    p: subprocess.Popen, sock: str, body: Callable[[QMPClient], Awaitable[_T]]
) -> _T:
    client = await _connect(p, sock)
    try:
        result = await body(client)
        try:
            await client.execute("quit")
        except QMPError:
            pass  # QEMU may drop the socket before replying to quit; it exits either way
        for _ in range(100):  # let it exit on its own, so reap() need not signal it
            if p.poll() is not None:
                break
            await asyncio.sleep(0.01)
        return result
    except QMPError as e:
        raise _SessionFailed(f"QMP failed: {e}") from None
    finally:
        try:
            await client.disconnect()
        except (QMPError, OSError, EOFError):
            pass


async def _connect(p: subprocess.Popen, sock: str) -> QMPClient:
    # QEMU creates the socket before machine init and serves QMP only after it, so a dead
    # QEMU shows up as a failed or dropped connection: check the process on every try.
    while True:
        if p.poll() is not None:
            raise _SessionFailed(_exit_text(p.returncode))
        if os.path.exists(sock):
            client = QMPClient("nestvirt-probe")
            try:
                await client.connect(sock)
                return client
            except QMPError:
                pass  # bound but not yet listening, or QEMU died during the greeting
        await asyncio.sleep(0.01)


def _exit_text(rc: int | None) -> str:
    if rc is not None and rc < 0:
        return f"QEMU was killed by signal {-rc} before QMP answered"
    return f"QEMU exited with status {rc} before QMP answered"


def _first_error(err_path: str, binary: str) -> str:
    """QEMU's first error line without the "qemu-system-x86_64: error:" decoration."""
    try:
        lines = [ln.strip() for ln in Path(err_path).read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if "warning:" not in ln] or lines
    if not errors:
        return ""
    line = errors[0]
    for prefix in (f"{binary}:", f"{os.path.basename(binary)}:"):
        if line.startswith(prefix):
            line = line[len(prefix):].strip()
    return line.removeprefix("error:").strip()


async def _query_kvm(client: QMPClient) -> tuple[bool, str]:
    info = await client.execute("query-kvm")
    if isinstance(info, dict) and info.get("enabled"):
        return True, ""
    return False, f"query-kvm answered {info}"


async def _read_schema(client: QMPClient) -> dict[str, Any]:
    answers: dict[str, Any] = {
        "schema": await client.execute("query-qmp-schema"),
        "commands": await client.execute("query-commands"),
        "version": await client.execute("query-version"),
        "machines": await client.execute("query-machines"),
        "cpu_props": [],
    }
    for typename in _CPU_TYPENAMES:
        for cmd in ("device-list-properties", "qom-list-properties"):
            try:
                props = await client.execute(cmd, {"typename": typename})
            except ExecuteError:
                continue  # unknown type or command in this QEMU: try the next
            answers["cpu_props"] = props
            return answers
    return answers


# --------------------------------------------------------------------------------------
# QMP schema: resolve the numeric type names that query-qmp-schema uses


class _Schema:
    def __init__(self, entries: Iterable[Mapping[str, Any]]):
        self.by_name = {e["name"]: e for e in entries if isinstance(e, Mapping) and "name" in e}

    def get(self, name: str | None, meta: str) -> Mapping[str, Any] | None:
        e = self.by_name.get(name) if name else None
        return e if e is not None and e.get("meta-type") == meta else None

    def members(self, type_name: str | None) -> dict[str, str]:
        """Member name -> type name of an object type ({} if not an object)."""
        obj = self.get(type_name, "object")
        if obj is None:
            return {}
        return {m["name"]: m.get("type", "") for m in obj.get("members", ())}

    def enum_values(self, type_name: str | None) -> frozenset[str]:
        enum = self.get(type_name, "enum")
        if enum is None:
            return frozenset()
        # "members" since QEMU 6.2 (with features); "values" before, and deprecated since.
        if "members" in enum:
            return frozenset(m["name"] for m in enum["members"])
        return frozenset(enum.get("values", ()))

    def element(self, type_name: str | None) -> str | None:
        arr = self.get(type_name, "array")
        return arr.get("element-type") if arr else None

    def command(self, name: str) -> Mapping[str, Any]:
        return self.get(name, "command") or {}


def _migration_facts(entries: Iterable[Mapping[str, Any]]) -> dict[str, frozenset[str]]:
    s = _Schema(entries)
    # migrate-set-capabilities(capabilities: [MigrationCapabilityStatus{capability: enum}])
    cap_list = s.members(s.command("migrate-set-capabilities").get("arg-type")).get("capabilities")
    cap_enum = s.members(s.element(cap_list)).get("capability")
    caps = s.enum_values(cap_enum)
    # MigrationParameters (query result) and MigrateSetParameters (command arguments).
    params = s.members(s.command("query-migrate-parameters").get("ret-type"))
    set_params = s.members(s.command("migrate-set-parameters").get("arg-type"))
    compression = s.enum_values(params.get("multifd-compression")
                                or set_params.get("multifd-compression"))
    return {
        "migration_capabilities": caps,
        "migration_parameters": frozenset(params) | frozenset(set_params),
        "multifd_compression": compression,
    }


def _qemu_facts(binary: str, answers: Mapping[str, Any], *, tried: bool, ok: bool,
                error: str) -> QemuFacts:
    ver = answers["version"].get("qemu", {})
    version_tuple = (int(ver.get("major", 0)), int(ver.get("minor", 0)),
                     int(ver.get("micro", 0)))
    mig = _migration_facts(answers["schema"])
    machines, default_machine = q35_machine_types(answers.get("machines") or [])
    return QemuFacts(
        binary=binary,
        version=".".join(map(str, version_tuple)),
        version_tuple=version_tuple,
        package=str(answers["version"].get("package", "")).strip(),
        migration_capabilities=mig["migration_capabilities"],
        migration_parameters=mig["migration_parameters"],
        multifd_compression=mig["multifd_compression"],
        legacy_compress="compress" in mig["migration_capabilities"],
        commands=frozenset(c["name"] for c in answers["commands"]),
        hv_props=frozenset(p["name"] for p in answers["cpu_props"]
                           if p.get("name", "").startswith("hv-")),
        accel_kvm_tried=tried,
        accel_kvm_ok=ok,
        accel_kvm_error=error,
        machine_types=machines,
        default_machine=default_machine,
    )


_Q35 = re.compile(r"^pc-q35-(\d+)\.(\d+)$")


def q35_machine_types(machines: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, ...], str]:
    """(versioned q35 machine types oldest first, the one plain "q35" aliases) from
    query-machines. Sorted as numbers: pc-q35-2.10 is newer than pc-q35-2.9."""
    names = [str(m.get("name", "")) for m in machines]
    versioned = sorted((n for n in names if _Q35.match(n)), key=machine_version)
    alias = next((str(m.get("name")) for m in machines if m.get("alias") == "q35"), "")
    return tuple(versioned), alias


def machine_version(name: str) -> tuple[int, int]:
    """(major, minor) of a versioned q35 type; (-1, -1) for anything else."""
    m = _Q35.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


# --------------------------------------------------------------------------------------
# nestvirt doctor

_KEY_CAPABILITIES = ("multifd", "xbzrle", "compress", "dirty-limit", "postcopy-ram")
_KEY_COMMANDS = ("calc-dirty-rate", "query-migrationthreads", "set-vcpu-dirty-limit")


def render_table(facts: HostFacts) -> str:
    """Human table for ``nestvirt doctor``: one "name  value" row per fact."""
    k, q = facts.kvm, facts.qemu

    def yn(b: bool) -> str:
        return "yes" if b else "no"

    if q.accel_kvm_ok:
        kvm_start = "ok"
    elif q.accel_kvm_tried:
        kvm_start = f"fails: {q.accel_kvm_error}"
    else:
        kvm_start = q.accel_kvm_error  # already says "not tried: why"

    rows: list[tuple[str, str]] = [
        ("accel", facts.accel),
        ("why", facts.accel_reason),
        ("cpu", f"{facts.vendor}, {facts.cpu_model or '?'} "
                f"(vmx: {yn(facts.cpu_flags_host_has_vmx)}, "
                f"svm: {yn(facts.cpu_flags_host_has_svm)})"),
        ("host kernel", facts.host_kernel),
        ("L1 gets", f"-cpu {facts.l1_cpu} (nested {facts.l1_nested})"),
        ("kvm device", f"{k.reason}"
                       + (f" (API {k.api_version})" if k.api_version is not None else "")),
        ("kvm create vm", yn(k.create_vm_ok)),
        ("kvm module", f"{k.module or 'none'} (nested param: {k.nested_param or 'n/a'})"),
    ]
    rows += [(f"kvm cap {name}", yn(k.caps.get(name, False))) for name in kvmcaps.CAP_NAMES]
    rows += [
        ("kvm hv cpuid", "n/a" if k.hv_cpuid is None else f"{len(k.hv_cpuid)} leaves"),
        ("qemu", f"{q.binary} {q.version}" + (f" ({q.package})" if q.package else "")),
        ("qemu -accel kvm", kvm_start),
        ("multifd compression", ", ".join(sorted(q.multifd_compression)) or "none listed"),
        ("legacy compress", "present" if q.legacy_compress else "absent"),
    ]
    rows += [(f"capability {c}", yn(c in q.migration_capabilities)) for c in _KEY_CAPABILITIES]
    rows += [(f"command {c}", yn(c in q.commands)) for c in _KEY_COMMANDS]
    hv = "none found" if not q.hv_props else (
        f"{len(q.hv_props)} (hv-evmcs: {yn('hv-evmcs' in q.hv_props)})")
    rows.append(("hv-* cpu props", hv))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
