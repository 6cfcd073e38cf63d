"""Every QEMU a run may use: where each binary comes from, how it is started, fetching one."""
