"""YAML files read so that an error can name the line: the line of every key and list item,
and a parse error's own line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.core.errors import UsageError


def load(path: Path, what: str) -> tuple[Any, dict[tuple, int]]:
    """(document, key_lines) of a YAML file; UsageError "WHAT PATH[:LINE]: ..." otherwise."""
    import yaml  # here, not at the top: only runs that read a YAML file need PyYAML

    try:
        text = Path(path).read_text(encoding="utf-8")
        return yaml.safe_load(text), key_lines(text)
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        spot = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{what} {path}{spot}: not YAML: {problem}") from e


def key_lines(text: str) -> dict[tuple, int]:
    """Line (1-based) of every mapping key and list item of a YAML text, by its path
    (("include", 0, "compression") -> 12)."""
    import yaml

    out: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                out[(*path, k.value)] = k.start_mark.line + 1
                walk(v, (*path, k.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[(*path, i)] = v.start_mark.line + 1
                walk(v, (*path, i))

    walk(yaml.compose(text), ())
    return out
