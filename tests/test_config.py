"""Server settings: flags override env vars, which override defaults."""

import argparse
from pathlib import Path

import pytest

from viper_server.config import ServerConfig, add_serve_arguments, config_from_args


def parse(argv, environ=None):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(argv), environ or {})


def test_defaults_are_loopback_tiny_models_and_a_local_db():
    config = parse([])
    assert config == ServerConfig()
    assert (config.host, config.models, config.db_path) == ("127.0.0.1", "tiny", Path("var/profiles.db"))
    assert config.max_message_bytes >= 64 * 1024 * 1024


def test_env_vars_fill_in_and_flags_win():
    environ = {"VIPER_PORT": "6000", "VIPER_DB": "/tmp/x.db", "VIPER_MAX_IMAGES": "8", "VIPER_MODELS": "viper"}
    config = parse(["--port", "7000", "--max-comment-chars", "10"], environ)
    assert config.port == 7000
    assert config.db_path == Path("/tmp/x.db")
    assert config.models == "viper"
    assert config.limits.max_images == 8
    assert config.limits.max_comment_chars == 10


def test_every_setting_has_a_flag():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    dests = {action.dest for action in parser._actions} - {"help"}
    expected = {name for name in ServerConfig.__dataclass_fields__ if name != "limits"}
    expected |= set(ServerConfig().limits.__dataclass_fields__)
    assert dests == expected


def test_unknown_model_kind_from_env_is_refused():
    with pytest.raises(ValueError, match="tiny or viper"):
        parse([], {"VIPER_MODELS": "huge"})
