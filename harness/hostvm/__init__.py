"""The KVM host VM: a Linux booted here under TCG (nested SVM) in which nestvirt runs itself
with ``--accel kvm`` on real KVM code, and whose results come back into the host's run."""
