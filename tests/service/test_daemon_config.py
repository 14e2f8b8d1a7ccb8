"""npcd.yaml, NPCD_* environment variables and flags: precedence, paths and error messages."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from npcd.service import config as daemon_config
from npcd.service.config import DaemonConfig, Limits


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    daemon_config.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_without_any_file(tmp_path):
    config = daemon_config.load(environ={}, cwd=tmp_path)
    assert config == DaemonConfig()
    assert config.listen == "127.0.0.1:50051" and config.metrics == "127.0.0.1:9464"
    assert config.engine == Path("engines/default.yaml") and config.personas == Path("personas")


def test_the_bundled_file_matches_the_defaults():
    repo = Path(__file__).resolve().parents[2]
    config = daemon_config.load(environ={}, cwd=repo)
    assert config.engine == repo / "engines" / "default.yaml" and config.engine.is_file()
    assert config.personas == repo / "personas"
    assert (config.listen, config.metrics, config.limits) == ("127.0.0.1:50051", "127.0.0.1:9464", Limits())


def test_file_then_environment_then_flags(tmp_path):
    (tmp_path / "npcd.yaml").write_text(
        "listen: 127.0.0.1:6000\npersonas: npcs\ntick_window_ms: 7\nlimits: {max_tokens: 100, max_line_chars: 50}\n")
    env = {"NPCD_LISTEN": "127.0.0.1:7000", "NPCD_MAX_TOKENS": "200", "NPCD_LOG_JSON": "true",
           "NPCD_CACHE": "/elsewhere"}  # unrelated NPCD_ variables are left alone
    config = daemon_config.load(flags("--max-tokens", "300", "--metrics", "0"), environ=env, cwd=tmp_path)
    assert config.listen == "127.0.0.1:7000"            # environment over file
    assert config.personas == tmp_path / "npcs"          # file paths are relative to the file
    assert config.tick_window_ms == 7.0
    assert config.limits.max_tokens == 300               # flag over environment over file
    assert config.limits.max_line_chars == 50
    assert config.log_json is True and not config.metrics_enabled


def test_explicit_config_file(tmp_path):
    other = tmp_path / "conf" / "daemon.yaml"
    other.parent.mkdir()
    other.write_text("engine: engines/big.yaml\n")
    assert daemon_config.load(flags("--config", str(other)), environ={}, cwd=tmp_path).engine == \
        other.parent / "engines" / "big.yaml"
    assert daemon_config.load(environ={"NPCD_CONFIG": str(other)}, cwd=tmp_path).engine == \
        other.parent / "engines" / "big.yaml"
    with pytest.raises(ValueError, match="missing.yaml: daemon config file not found"):
        daemon_config.load(flags("--config", str(tmp_path / "missing.yaml")), environ={}, cwd=tmp_path)


@pytest.mark.parametrize("text, message", [
    ("listen: nowhere\n", "listen must be HOST:PORT, got 'nowhere'"),
    ("metrics: 127.0.0.1\n", "metrics must be HOST:PORT or 0 (off), got '127.0.0.1'"),
    ("tick_window_ms: lots\n", "tick_window_ms must be a number, got 'lots'"),
    ("tick_window_ms: 5000\n", "tick_window_ms must be in 0..1000, got 5000"),
    ("grace_s: -1\n", "grace_s must be in 0..3600, got -1"),
    ("log_json: maybe\n", "log_json must be true or false, got 'maybe'"),
    ("log_level: loud\n", "log_level must be debug, info, warning or error, got 'loud'"),
    ("limits: {max_tokens: 0}\n", "limits.max_tokens must be >= 1, got 0"),
    ("limits: {max_tokens: 1.5}\n", "limits.max_tokens must be an integer, got 1.5"),
    ("limits: {max_bananas: 3}\n", "unknown limit(s) ['max_bananas']"),
    ("bind: 127.0.0.1:1\n", "unknown setting(s) ['bind']"),
    ("limits: 3\n", "limits must be a mapping, got 3"),
    ("- a\n- b\n", "must be a mapping of settings"),
    ("listen: [\n", "not valid YAML"),
])
def test_bad_file_values_name_the_file_and_setting(tmp_path, text, message):
    (tmp_path / "npcd.yaml").write_text(text)
    with pytest.raises(ValueError) as info:
        daemon_config.load(environ={}, cwd=tmp_path)
    assert str(info.value).startswith(str(tmp_path / "npcd.yaml") + ": ")
    assert message in str(info.value)


def test_bad_environment_and_flag_values_say_where_they_came_from(tmp_path):
    with pytest.raises(ValueError, match=r"^environment: limits.max_tokens must be an integer, got 'many'"):
        daemon_config.load(environ={"NPCD_MAX_TOKENS": "many"}, cwd=tmp_path)
    with pytest.raises(ValueError, match=r"^command line: listen must be HOST:PORT"):
        daemon_config.load(flags("--listen", "50051"), environ={}, cwd=tmp_path)


def test_request_limits_cannot_exceed_the_engines_sampling_bounds(tmp_path):
    with pytest.raises(ValueError, match=r"limits.max_tokens must be <= 512 \(the engine's bound\), got 600"):
        daemon_config.load(environ={"NPCD_MAX_TOKENS": "600"}, cwd=tmp_path)
    assert daemon_config.load(environ={"NPCD_MAX_TOKENS": "512"}, cwd=tmp_path).limits.max_tokens == 512
