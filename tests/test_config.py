"""Server settings: flags override env vars, which override defaults."""

import argparse

import pytest

from viper_server.config import ServerConfig, add_serve_arguments, config_from_args


def parse(argv, environ=None):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(argv), environ or {})


def test_defaults_are_loopback_tiny_models_and_a_local_db():
    config = parse([])
    assert config == ServerConfig()
    assert (config.host, config.models, config.db) == ("127.0.0.1", "toy", "var/profiles.db")
    assert config.max_message_bytes >= 64 * 1024 * 1024


def test_env_vars_fill_in_and_flags_win():
    environ = {"VIPER_PORT": "6000", "VIPER_DB": "/tmp/x.db", "VIPER_MAX_IMAGES": "8", "VIPER_MODELS": "viper"}
    config = parse(["--port", "7000", "--max-comment-chars", "10"], environ)
    assert config.port == 7000
    assert config.db == "/tmp/x.db"
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
    with pytest.raises(ValueError, match="models must be tiny or .*viper"):
        parse([], {"VIPER_MODELS": "huge"})


def test_help_shows_every_default_as_a_user_would_type_it(capsys):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert "default None" not in help_text and "default True" not in help_text and "default False" not in help_text
    assert "(env VIPER_METRIC_CACHE; default on)" in help_text
    assert "(env VIPER_CPU_OFFLOAD; default off)" in help_text
    assert "default 2000 for viper, 64 for tiny" in help_text


def test_idefics2_dtype_is_a_setting():
    assert parse([]).idefics2_dtype == "auto"
    assert parse(["--idefics2-dtype", "float32"]).idefics2_dtype == "float32"
    with pytest.raises(ValueError, match="idefics2_dtype must be"):
        parse([], {"VIPER_IDEFICS2_DTYPE": "int8"})


def test_warnings_from_our_own_code_fail_the_tests():
    import warnings

    with pytest.raises(UserWarning):
        warnings.warn_explicit("a notice", UserWarning, "viper_server/x.py", 1, module="viper_server.x")
