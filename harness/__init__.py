"""nestvirt: nested virtualization test harness (L0 QEMU -> L1 KVM -> L2)."""

__version__ = "0.1.0"
