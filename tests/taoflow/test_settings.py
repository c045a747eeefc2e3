"""Settings: each component named once (its class statement) and found by that name everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from taoflow.exceptions import ConfigError
from taoflow.settings import CoreSettings, Settings, StreamSettings


def test_a_component_reads_its_variables_its_table_and_the_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "taoflow.toml"
    toml.write_text('log_level = "WARNING"\n[stream]\nbatch_size = 123\n[learner]\nk = 3\n')
    monkeypatch.setenv("TAOFLOW_CONFIG", str(toml))
    monkeypatch.setenv("TAOFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TAOFLOW_STREAM_SESSION_TIMEOUT_S", "7")
    settings = Settings(overrides={"learner": {"k": 5}})
    assert settings.core.data_dir == tmp_path / "data" and settings.core.log_level == "WARNING"
    assert settings.stream.batch_size == 123 and settings.stream.session_timeout_s == 7
    assert settings.learner.k == 5  # init kwargs > environment > table > defaults
    assert settings.stream is settings.stream  # validated once
    assert list(settings.components()) == ["core", "kafka", "broker", "limits", "sdk", "stream", "learner", "serve"]
    assert StreamSettings.model_config["env_prefix"] == "TAOFLOW_STREAM_"
    assert CoreSettings.model_config["env_prefix"] == "TAOFLOW_" and CoreSettings.toml_section is None
    assert "TAOFLOW_STREAM_BATCH_SIZE" in settings.environ()


def test_an_unknown_or_invalid_setting_names_its_component(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAOFLOW_CONFIG", raising=False)
    with pytest.raises(ConfigError, match=r"stream\.batch_size"):
        _ = Settings(overrides={"stream": {"batch_size": "many"}}).stream
    with pytest.raises(ConfigError, match=r"serve\.no_such_thing"):
        _ = Settings(overrides={"serve": {"no_such_thing": 1}}).serve
