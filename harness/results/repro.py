"""Reproducer bundles: what a failed variant leaves behind so one command runs it again.

A bundle sits in the variant's artefact directory next to what the engine already keeps there
(QEMU command lines, QMP transcripts, serial logs): ``variant.json`` (the exact variant, the
cached kernel and initramfs it booted, the QEMU binary and accel), ``host.json`` (the probe)
and ``repro.sh`` (templates/repro.sh.j2), which runs ``nestvirt run --variant-json`` on it.
"""

from __future__ import annotations

import json
import shlex
import stat
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from harness.core.errors import UsageError
from harness.core.paths import REPO, TEMPLATES
from harness.scenario.result import ScenarioResult

VARIANT_FORMAT = "nestvirt-variant/1"
# Verdicts that leave a bundle: everything a person may want to run again.
BUNDLE_VERDICTS = ("fail", "error", "known-issue")
BUNDLE_FILES = ("variant.json", "host.json", "repro.sh")


def failed_checks(result: ScenarioResult) -> list[str]:
    return [c.name for c in result.checks if not c.ok]


def write_bundle(result: ScenarioResult, variant_json: Mapping[str, Any],
                 image_json: Mapping[str, Any], host_json: Mapping[str, Any]) -> list[str]:
    """Write variant.json, host.json and repro.sh into the result's artefact dir.

    Returns the file names written (also added to result.artifacts["repro"]).
    """
    workdir = Path(result.artifacts["dir"])
    workdir.mkdir(parents=True, exist_ok=True)
    qemu = host_json.get("qemu", {})
    plan = variant_json.get("qemu") or {}
    if plan:
        # The variant's own source binary (its QemuPlan names both sides), not the run's.
        qemu = {"binary": plan.get("src", ""), "version": plan.get("src_version", "")}
    doc = {
        "format": VARIANT_FORMAT,
        "id": result.id,
        "variant": dict(variant_json),
        "image": dict(image_json),
        "qemu": {"binary": qemu.get("binary", ""), "version": qemu.get("version", "")},
        "accel": host_json.get("accel", "auto"),
        "original": {"verdict": result.verdict, "reason": result.reason,
                     "failed_checks": failed_checks(result),
                     "when": time.strftime("%FT%T%z")},
    }
    (workdir / "variant.json").write_text(json.dumps(doc, indent=2))
    (workdir / "host.json").write_text(json.dumps(dict(host_json), indent=2))
    script = workdir / "repro.sh"
    script.write_text(render_repro(doc))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    result.artifacts["repro"] = str(script)
    files = result.artifacts.setdefault("files", [])
    for name in BUNDLE_FILES:
        if name not in files:
            files.append(name)
    files.sort()
    return list(BUNDLE_FILES)


def render_repro(doc: Mapping[str, Any]) -> str:
    """repro.sh for one variant.json document: same python, repo, QEMU, accel and artefacts."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    return env.get_template("repro.sh.j2").render(
        id=doc["id"], verdict=doc["original"]["verdict"],
        failed=doc["original"]["failed_checks"], when=doc["original"]["when"],
        qemu=doc["qemu"]["binary"], qemu_version=doc["qemu"]["version"], accel=doc["accel"],
        kernel=doc["image"]["kernel"]["image"], initramfs=doc["image"]["initramfs"],
        python=sys.executable, repo=str(REPO))


def load_variant_file(path: Path) -> dict[str, Any]:
    """A bundle's variant.json, or a bare variant (Variant.to_json) wrapped like one."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"--variant-json {path}: {e.strerror}") from e
    except ValueError as e:
        raise UsageError(f"--variant-json {path}: not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise UsageError(f"--variant-json {path}: expected an object")
    if doc.get("format") == VARIANT_FORMAT:
        return doc
    if "spec" in doc and "mode" in doc:
        return {"format": VARIANT_FORMAT, "id": doc.get("id"), "variant": doc, "image": None,
                "qemu": None, "accel": None, "original": None}
    raise UsageError(f"--variant-json {path}: neither a bundle's variant.json nor a variant")


def compare_failure(original: Mapping[str, Any] | None, result: ScenarioResult) -> str:
    """One line: did this run fail the way the original did?"""
    if not original:
        return ""
    was = sorted(original.get("failed_checks") or [])
    now = sorted(failed_checks(result))
    if was and was == now:
        return f"REPRODUCED: {result.id} failed the same checks: {', '.join(now)}"
    if not was and result.verdict == original.get("verdict"):
        return f"REPRODUCED: {result.id} is {result.verdict} again: {result.reason[:200]}"
    return (f"NOT REPRODUCED: {result.id} was {original.get('verdict')} "
            f"({', '.join(was) or original.get('reason', '')[:120]}), now {result.verdict} "
            f"({', '.join(now) or result.reason[:120] or 'all checks ok'})")
