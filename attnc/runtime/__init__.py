"""The runtime: launch plans (and, later, the kernel cache, autotuner and launchers)."""
