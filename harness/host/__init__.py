"""What this host and a QEMU binary can do: accel, vendor, KVM caps, Hyper-V support, QMP schema."""
