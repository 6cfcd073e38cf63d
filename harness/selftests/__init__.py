"""The kernel's KVM selftests: build each test, run it in L1 (or on the host) with deadlines."""
