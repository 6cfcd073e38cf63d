"""`pytest ci/` runs the smoke matrix (ci/smoke.yaml) as one test per variant.

Name another matrix file (`pytest -n 2 ci/smoke-mini.yaml`) or pass
`--nestvirt-matrix ci/nightly.yaml` to run that one; see harness/runners/pytest_plugin.py.
"""

from importlib.metadata import entry_points

# An installed nestvirt registers the plugin through its pytest11 entry point; a checkout run
# with PYTHONPATH does not have it, so register it here (never twice: pytest refuses that).
if not any(ep.value == "harness.runners.pytest_plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["harness.runners.pytest_plugin"]

# A directory run means the smoke matrix; other matrix files run when named.
collect_ignore = ["nightly.yaml", "smoke-mini.yaml"]
