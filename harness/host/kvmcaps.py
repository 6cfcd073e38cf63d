"""Read what the host's /dev/kvm offers through its system ioctls, without raising.

Only system-level ioctls are used (plus one KVM_CREATE_VM that is closed at once), so this
is safe to call on any host: every failure becomes ``ok=False`` with a one-line reason.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

KVM_PATH = "/dev/kvm"
KVM_API_VERSION = 12  # the only version Linux has ever shipped; anything else is not KVM

# _IO(KVMIO=0xAE, nr)
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03

# Capabilities the harness gates on, by the name used in HostFacts.kvm.caps.
CAP_NUMBERS: dict[str, tuple[int, ...]] = {
    "nested_state": (157,),
    "hyperv_enlightened_vmcs": (163,),
    "exception_payload": (164,),
    "hyperv_cpuid": (167,),
    # arm64 only has the ACQ_REL flavour; either one means KVM can give QEMU a dirty ring.
    "dirty_log_ring": (192, 223),
    "sys_hyperv_cpuid": (191,),
}
CAP_NAMES: tuple[str, ...] = tuple(CAP_NUMBERS)


class _KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


_CPUID2_HEADER = struct.Struct("=II")  # struct kvm_cpuid2 { __u32 nent; __u32 padding; ... }
_ENTRY_SIZE = ctypes.sizeof(_KvmCpuidEntry2)


def _iowr(nr: int, size: int) -> int:
    # Linux asm-generic/ioctl.h: dir(2 bits: read|write=3) << 30 | size << 16 | type << 8 | nr
    return (3 << 30) | (size << 16) | (0xAE << 8) | nr


# The ioctl number encodes sizeof(struct kvm_cpuid2), i.e. the 8-byte header only.
KVM_GET_SUPPORTED_HV_CPUID = _iowr(0xC1, _CPUID2_HEADER.size)

# KVM returns 10 or 11 Hyper-V leaves today; this bound only stops a runaway E2BIG loop.
_HV_CPUID_MAX_NENT = 256

HvCpuidEntry = tuple[int, int, int, int, int, int]  # (function, index, eax, ebx, ecx, edx)


@dataclass(frozen=True)
class KvmDevice:
    """What /dev/kvm answered. ``ok`` means it opened and speaks KVM API 12.

    ``reason`` is "ok" when the device opened and KVM_CREATE_VM worked, otherwise
    "unavailable: <why>" naming the first step that failed. ``caps`` always has every
    name in CAP_NAMES (False when unknown). ``hv_cpuid`` is None unless cap 191 is present
    and the ioctl succeeded.
    """

    ok: bool
    reason: str
    api_version: int | None
    caps: dict[str, bool]
    create_vm_ok: bool
    hv_cpuid: tuple[HvCpuidEntry, ...] | None


def _err(e: OSError) -> str:
    name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else "?"
    return f"{name} ({e.strerror or e})"


def read_kvm(path: str = KVM_PATH) -> KvmDevice:
    """Open ``path`` and query API version, capabilities, VM creation and Hyper-V CPUID."""
    no_caps = dict.fromkeys(CAP_NAMES, False)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return KvmDevice(False, f"unavailable: open {path}: {_err(e)}", None, no_caps, False, None)
    try:
        try:
            api = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        except OSError as e:
            return KvmDevice(
                False, f"unavailable: KVM_GET_API_VERSION: {_err(e)}", None, no_caps, False, None
            )
        if api != KVM_API_VERSION:
            return KvmDevice(
                False, f"unavailable: KVM API version {api}, expected {KVM_API_VERSION}",
                api, no_caps, False, None,
            )
        caps = {name: any(_check_extension(fd, n) > 0 for n in nums)
                for name, nums in CAP_NUMBERS.items()}
        create_error = _try_create_vm(fd)
        hv_cpuid = _supported_hv_cpuid(fd) if caps["sys_hyperv_cpuid"] else None
        reason = "ok"
        if create_error is not None:
            reason = f"unavailable: KVM_CREATE_VM fails: {create_error}"
        return KvmDevice(True, reason, api, caps, create_error is None, hv_cpuid)
    finally:
        os.close(fd)


def _check_extension(fd: int, cap: int) -> int:
    # Kernels without a feature (e.g. Hyper-V compiled out) answer 0: unsupported, not an error.
    try:
        return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, cap)
    except OSError:
        return 0


def _try_create_vm(fd: int) -> str | None:
    """Create and immediately close a VM; None on success, else the error text."""
    try:
        vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
    except OSError as e:
        return _err(e)
    os.close(vm_fd)
    return None


def _supported_hv_cpuid(fd: int) -> tuple[HvCpuidEntry, ...] | None:
    """KVM_GET_SUPPORTED_HV_CPUID on the system fd; grows the buffer on E2BIG."""
    nent = 16
    while nent <= _HV_CPUID_MAX_NENT:
        buf = bytearray(_CPUID2_HEADER.size + nent * _ENTRY_SIZE)
        _CPUID2_HEADER.pack_into(buf, 0, nent, 0)
        try:
            fcntl.ioctl(fd, KVM_GET_SUPPORTED_HV_CPUID, buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG:
                nent *= 2
                continue
            return None
        got, _ = _CPUID2_HEADER.unpack_from(buf, 0)
        entries = []
        for i in range(min(got, nent)):
            ent = _KvmCpuidEntry2.from_buffer_copy(buf, _CPUID2_HEADER.size + i * _ENTRY_SIZE)
            entries.append((ent.function, ent.index, ent.eax, ent.ebx, ent.ecx, ent.edx))
        return tuple(entries)
    return None
