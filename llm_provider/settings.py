"""Reading a node's settings (`handlers.settings.Settings`) the same way under every host.

Each setting is, in order of precedence: a command-line flag (`--job-timeout 30`), an environment
variable (`LLMP_JOB_TIMEOUT=30`), a key of the TOML file named by `--config` or `LLMP_CONFIG`
(`job_timeout = 30`), and its default.  `emulator node`, `emulator up`, the ASGI host and the
gunicorn host all read them here.  An optional limit is turned off with `off` (flag, variable) or
`false` (TOML).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handlers.settings import Settings

ENV_PREFIX = "LLMP_"
CONFIG_ENV = "LLMP_CONFIG"
_OFF = "off"


class SettingsError(ValueError):
    """A setting with a value it cannot take, or a config file that cannot be read; says which, and where from."""


@dataclasses.dataclass(frozen=True)
class _Setting:
    name: str
    kind: type[float] | type[int]
    optional: bool  # may be off (None)
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def parse(self, raw: object, where: str) -> Any:
        if raw is None or (self.optional and (raw is False or (isinstance(raw, str) and raw.strip().lower() == _OFF))):
            if self.optional:
                return None
            raise SettingsError(f"{where}: {self.name} cannot be off")
        if isinstance(raw, bool):
            raise SettingsError(f"{where}: {self.name} takes a number, not {raw!r}")
        whole = not (self.kind is int and isinstance(raw, float) and not raw.is_integer())
        try:
            value = self.kind(raw) if whole else None  # type: ignore[arg-type, call-overload]  # whatever TOML or a string holds
        except (TypeError, ValueError):
            value = None
        if value is None:
            raise SettingsError(f"{where}: {self.name} takes {'an integer' if self.kind is int else 'a number'}, not {raw!r}")
        if not math.isfinite(value) or value <= 0:
            raise SettingsError(f"{where}: {self.name} must be above 0, not {raw!r}")
        return value


def _settings() -> list[_Setting]:
    hints = typing.get_type_hints(Settings)
    found = []
    for spec in dataclasses.fields(Settings):
        args = typing.get_args(hints[spec.name])
        optional = type(None) in args
        kind = next(arg for arg in args if arg is not type(None)) if optional else hints[spec.name]
        found.append(_Setting(spec.name, kind, optional, spec.default, spec.metadata["help"]))
    return found


SETTINGS: list[_Setting] = _settings()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting, and `--config`.  A flag not given is None: the environment, the file or the default decide."""
    group = parser.add_argument_group("limits (also LLMP_* variables, or keys of the --config file)")
    group.add_argument("--config", type=Path, default=None, help=f"a TOML file of settings (default: ${CONFIG_ENV})")
    for setting in SETTINGS:
        shown = _OFF if setting.default is None else setting.default
        group.add_argument(setting.flag, dest=setting.name, default=None, metavar="N", help=f"{setting.help} [{setting.env}; default {shown}]")


def load(
    flags: argparse.Namespace | Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ,
) -> Settings:
    """The settings, each from its flag, else its variable, else the config file, else its default."""
    given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
    config_file = given.get("config") or environ.get(CONFIG_ENV)
    from_file = _read_config(Path(config_file).expanduser()) if config_file else {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if given.get(setting.name) is not None:
            values[setting.name] = setting.parse(given[setting.name], setting.flag)
        elif setting.env in environ:
            values[setting.name] = setting.parse(environ[setting.env], setting.env)
        elif setting.name in from_file:
            values[setting.name] = setting.parse(from_file[setting.name], f"{config_file}")
    return Settings(**values)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise SettingsError(f"config file {path}: {error.strerror or error}") from error
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"config file {path}: not TOML: {error}") from error
    known = {setting.name for setting in SETTINGS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"config file {path}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data


def as_flags(settings: Settings, otherwise: Settings | None = None) -> list[str]:
    """The settings, as flags, for a node started as another process: those that differ from what it would
    read without them (`otherwise`: its own variables and config file; by default, the defaults)."""
    otherwise = otherwise or Settings()
    flags: list[str] = []
    for setting in SETTINGS:
        value = getattr(settings, setting.name)
        if value != getattr(otherwise, setting.name):
            flags += [setting.flag, _OFF if value is None else repr(value)]
    return flags
