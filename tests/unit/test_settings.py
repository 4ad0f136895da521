"""A node's settings are read the same way under every host: flag, then LLMP_* variable, then TOML file, then default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from handlers.settings import Settings
from llm_provider import settings
from llm_provider.node import NodeOptions
from llm_provider.settings import SettingsError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    settings.add_flags(parser)
    return parser.parse_args(argv)


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_nothing_given_is_the_defaults() -> None:
    assert settings.load(parse(), environ={}) == Settings()


def test_a_flag_beats_a_variable_which_beats_the_file(tmp_path: Path) -> None:
    file = config(tmp_path, "job_timeout = 10\nretention = 20\nmax_attempts = 5\n")
    environ = {"LLMP_CONFIG": str(file), "LLMP_JOB_TIMEOUT": "11", "LLMP_RETENTION": "21"}
    loaded = settings.load(parse("--job-timeout", "12"), environ=environ)
    assert (loaded.job_timeout, loaded.retention, loaded.max_attempts) == (12.0, 21.0, 5)
    assert loaded.drain_grace == Settings().drain_grace


def test_the_config_flag_beats_the_config_variable(tmp_path: Path) -> None:
    chosen = config(tmp_path, "max_attempts = 7\n")
    environ = {"LLMP_CONFIG": str(tmp_path / "missing.toml")}
    assert settings.load(parse("--config", str(chosen)), environ=environ).max_attempts == 7


def test_an_optional_limit_is_turned_off_with_off_or_false(tmp_path: Path) -> None:
    file = config(tmp_path, "idle_timeout = false\n")
    environ = {"LLMP_CONFIG": str(file), "LLMP_FIRST_TOKEN_TIMEOUT": "5"}
    assert settings.load(parse("--first-token-timeout", "off"), environ=environ).first_token_timeout is None
    assert settings.load(parse(), environ=environ) == Settings(first_token_timeout=5.0, idle_timeout=None)


@pytest.mark.parametrize(
    ("argv", "environ", "file", "says"),
    [
        (["--job-timeout", "soon"], {}, None, "--job-timeout: job_timeout takes a number"),
        ([], {"LLMP_MAX_ATTEMPTS": "2.5"}, None, "LLMP_MAX_ATTEMPTS: max_attempts takes an integer"),
        ([], {"LLMP_RETENTION": "-1"}, None, "retention must be above 0"),
        ([], {"LLMP_JOB_TIMEOUT": "off"}, None, "job_timeout takes a number, not 'off'"),
        ([], {}, "job_timeot = 3\n", "unknown settings job_timeot"),
        ([], {}, "job_timeout = \n", "not TOML"),
        ([], {}, "max_attempts = true\n", "max_attempts takes a number, not True"),
    ],
)
def test_a_bad_value_is_refused_saying_where_it_came_from(
    tmp_path: Path, argv: list[str], environ: dict[str, str], file: str | None, says: str
) -> None:
    if file is not None:
        environ = {**environ, "LLMP_CONFIG": str(config(tmp_path, file))}
    with pytest.raises(SettingsError, match=says):
        settings.load(parse(*argv), environ=environ)


def test_a_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="missing.toml"):
        settings.load(parse("--config", str(tmp_path / "missing.toml")), environ={})


def test_settings_pass_to_another_process_as_flags() -> None:
    changed = Settings(job_timeout=30.0, idle_timeout=2.5, max_attempts=5, max_body_bytes=1024, retention=86400.0 * 7)
    flags = settings.as_flags(changed)
    assert "--drain-grace" not in flags  # defaults are not repeated
    assert settings.load(parse(*flags), environ={}) == changed


def test_every_setting_has_a_flag_a_variable_and_help() -> None:
    for setting in settings.SETTINGS:
        assert setting.help
        assert vars(parse(setting.flag, "1"))[setting.name] == "1"
        assert settings.load(environ={setting.env: "1"}) == Settings(**{setting.name: 1})


def test_the_hosts_read_the_same_settings_from_the_environment(tmp_path: Path) -> None:
    file = config(tmp_path, "drain_grace = 3\n")
    environ = {"LLMP_NAME": "n.dev", "LLMP_HOME": str(tmp_path), "LLMP_CONFIG": str(file), "LLMP_MAX_ATTEMPTS": "9"}
    options = NodeOptions.from_environment(environ)
    assert options.settings == Settings(drain_grace=3.0, max_attempts=9)


def test_a_child_node_gets_flags_for_what_its_own_environment_would_set_otherwise(tmp_path: Path) -> None:
    environ = {"LLMP_JOB_TIMEOUT": "30", "LLMP_CONFIG": str(config(tmp_path, "idle_timeout = 5\n"))}
    chosen = settings.load(parse("--job-timeout", "60", "--idle-timeout", "off"), environ=environ)
    child_alone = settings.load(environ=environ)
    flags = settings.as_flags(chosen, otherwise=child_alone)
    assert settings.load(parse(*flags), environ=environ) == chosen == Settings()


def test_values_pass_as_flags_exactly() -> None:
    precise = Settings(retention=1234567.0, job_timeout=0.1234567)
    assert settings.load(parse(*settings.as_flags(precise)), environ={}) == precise


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_value_that_is_not_finite_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="must be above 0"):
        settings.load(environ={"LLMP_DRAIN_GRACE": value})
