"""Where the settings come from, and what is refused before they are read.

Settings are read, highest priority first, from: the arguments a caller passes, the ``AGENT_*``
environment variables, the file ``AGENT_CONFIG_FILE`` names (TOML for ``.toml``, YAML for ``.yaml``
and ``.yml``, keyed as the settings are: ``[kafka]`` / ``bootstrap_servers = ...``), then the
defaults. A nested group set in both merges field by field: the environment wins per field.

Refused at start, with the closest known name (:class:`SettingsRefused`):

- an ``AGENT_*`` variable that is no setting (``AGENT_KAFKA__BOOTSTRAP_SERVER``), except the names
  the service and its tools read outside the settings (:data:`NOT_SETTINGS`) and ``AGENT_TEST_*``,
  which the test suite reads;
- a file that is missing, does not parse, or names what is no setting.

A value a setting refuses (from either place) is refused by the settings' own validation, naming it.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

PREFIX = "AGENT_"
CONFIG_FILE = "AGENT_CONFIG_FILE"
# variables of the AGENT_ prefix that are read outside the settings
NOT_SETTINGS: tuple[str, ...] = (
    CONFIG_FILE,  # this file of settings
    "AGENT_SERVICE_SUPERVISOR_PID",  # set by `agent-service run --workers` in each worker's environment
    "AGENT_KAFKA_LIBS",  # where the development tools find Apache Kafka's jars
    "AGENT_SCHEMA_REGISTRY_HOME",  # where the development tools find the Schema Registry they run
    "AGENT_LOCAL_DIR",  # where `agent-service local` keeps its servers' data
)
NOT_SETTINGS_PREFIXES: tuple[str, ...] = ("AGENT_TEST_",)  # the test suite's own switches


class SettingsRefused(ValueError):
    """A setting's name, or the file of settings, cannot be taken: the service does not start."""


def _names(field_name: str, field: FieldInfo) -> list[str]:
    """The names a field is read under: its own, and its validation aliases."""
    names = [field_name]
    alias = field.validation_alias
    if isinstance(alias, str):
        names.append(alias)
    elif isinstance(alias, AliasChoices):
        names.extend(choice for choice in alias.choices if isinstance(choice, str))
    return names


def _model(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_mapping(field: FieldInfo) -> bool:
    origin = typing.get_origin(field.annotation) or field.annotation
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _walk(model: type[BaseModel], prefix: str, delimiter: str, names: set[str], open_: set[str]) -> None:
    for field_name, field in model.model_fields.items():
        for name in _names(field_name, field):
            full = f"{prefix}{name.upper()}"
            names.add(full)
            nested = _model(field)
            if nested is not None:
                _walk(nested, full + delimiter, delimiter, names, open_)
            elif _is_mapping(field):  # AGENT_TENANCY__TENANTS__ACME__WEIGHT sets one entry
                open_.add(full + delimiter)


def setting_names(settings_cls: type[BaseSettings]) -> set[str]:
    """Every ``AGENT_*`` variable that sets something (a nested group's own name included)."""
    names: set[str] = set()
    _walk(settings_cls, PREFIX, "__", names, set())
    return names


def check_environment(settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
    """Refuse the first ``AGENT_*`` variable of ``environ`` that is no setting, naming the closest one."""
    names: set[str] = set()
    open_: set[str] = set()
    _walk(settings_cls, PREFIX, "__", names, open_)
    for raw in sorted(environ):
        name = raw.upper()
        if not name.startswith(PREFIX) or name in names or name in NOT_SETTINGS:
            continue
        if name.startswith(NOT_SETTINGS_PREFIXES) or name.startswith(tuple(open_)):
            continue
        raise SettingsRefused(_unknown(name, names))


def _unknown(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    if close:
        return f"{name} is not a setting; did you mean {close[0]}?"
    return f"{name} is not a setting (the settings are listed in the README, section Settings)"


def check_keys(model: type[BaseModel], data: Mapping[str, Any], where: str = "") -> None:
    """Refuse the first key of ``data`` (a file's contents) that is no field of ``model``, naming the closest."""
    fields = {name: field for field_name, field in model.model_fields.items() for name in _names(field_name, field)}
    for key, value in data.items():
        path = f"{where}{key}"
        field = fields.get(str(key))
        if field is None:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1, cutoff=0.6)
            guess = f"; did you mean {where}{close[0]}?" if close else ""
            raise SettingsRefused(f"{path} is not a setting{guess}")
        nested = _model(field)
        if nested is not None and isinstance(value, Mapping):
            check_keys(nested, value, path + ".")


def file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    """The settings in the file at ``path``, checked: it exists, parses, and names settings only."""
    if not path.is_file():
        raise SettingsRefused(f"{CONFIG_FILE}={path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            toml = TomlConfigSettingsSource(settings_cls, toml_file=path)
            source: PydanticBaseSettingsSource = toml
            data: object = toml.toml_data
        elif suffix in (".yaml", ".yml"):
            yml = YamlConfigSettingsSource(settings_cls, yaml_file=path)
            source, data = yml, yml.yaml_data
        else:
            raise SettingsRefused(f"{CONFIG_FILE}={path}: a settings file is .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SettingsRefused(f"{CONFIG_FILE}={path} does not parse: {exc}") from None
    if not isinstance(data, Mapping):
        raise SettingsRefused(f"{CONFIG_FILE}={path}: the file holds a table of settings, not {type(data).__name__}")
    try:
        check_keys(settings_cls, data)
    except SettingsRefused as exc:
        raise SettingsRefused(f"{CONFIG_FILE}={path}: {exc}") from None
    return source


class CheckedSettings(BaseSettings):
    """Settings read from the caller, the environment and the file of settings, in that order, with
    unknown names refused first (see the module's documentation). It holds no fields of its own."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        check_environment(settings_cls, os.environ)
        path = os.environ.get(CONFIG_FILE)
        if not path:
            return init_settings, env_settings, dotenv_settings, file_secret_settings
        return init_settings, env_settings, dotenv_settings, file_source(settings_cls, Path(path)), file_secret_settings
