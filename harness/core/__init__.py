"""Foundation every layer may use: errors, bounded subprocesses, ports, the content-keyed cache."""
