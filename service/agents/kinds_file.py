"""A kinds file read (TOML or YAML, by its suffix), its top level checked, and its ``schedules``
(each a :class:`~service.core.schedule_spec.ScheduleSpec`, docs/SCHEDULES.md); its ``kinds`` are
:mod:`service.agents.declared`'s."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from service.core.errors import AgentError
from service.core.schedule_spec import ScheduleSpec, describe_errors


class KindsFileError(AgentError):
    """A kinds file the service cannot run: the message names the file, the kind and the field."""


def read_kinds_file(path: Path) -> Any:
    """The file's data, parsed as TOML or YAML by its suffix."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KindsFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise KindsFileError(f"{path}: not UTF-8: {exc.reason}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise KindsFileError(f"{path}: not valid {'TOML' if suffix == '.toml' else 'YAML'}: {exc}") from exc
    raise KindsFileError(f"{path}: unknown format {suffix or '(no suffix)'}: name it .toml, .yaml or .yml")

def load_schedules(path: Path) -> list[ScheduleSpec]:
    """The schedules a kinds file declares beside its kinds (top-level ``schedules``, optional)."""
    data = read_kinds_file(path)
    check_top_level(path, data)
    return schedules_of(path, data.get("schedules", []))


def check_top_level(path: Path, data: Any) -> None:
    if not isinstance(data, dict) or "kinds" not in data or not set(data) <= {"kinds", "schedules"}:
        raise KindsFileError(f"{path}: expected the top-level key kinds (a list of kinds) and, optionally, "
                             "schedules (a list of schedules)")


def schedules_of(path: Path, raw: Any) -> list[ScheduleSpec]:
    """Each entry of ``schedules`` validated; an error names ``schedules[i].<field>``."""
    if not isinstance(raw, list):
        raise KindsFileError(f"{path}: schedules: expected a list of schedules")
    specs: list[ScheduleSpec] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise KindsFileError(f"{path}: schedules[{i}]: expected a table of name, kind, cron or every_s, ...")
        try:
            spec = ScheduleSpec.model_validate(entry)
        except ValidationError as exc:
            raise KindsFileError(f"{path}: {describe_errors(exc, f'schedules[{i}]')}") from exc
        twin = next((j for j, other in enumerate(specs) if other.name == spec.name), None)
        if twin is not None:
            raise KindsFileError(f"{path}: schedules[{i}].name: {spec.name!r} is declared twice "
                                 f"(schedules[{twin}] and schedules[{i}])")
        specs.append(spec)
    return specs
