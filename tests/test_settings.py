"""One settings object: the same coercion and checks for flags, config values and library calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from privtext.errors import UsageError
from privtext.settings import Format, OnError, PerturbSettings, default_workers, load_config
from privtext.text import OovPolicy


def test_flags_and_config_coerce_the_same_way() -> None:
    from_config = PerturbSettings.from_sources(
        {"epsilon": 3, "workers": 0, "chunk_size": "50", "oov": "drop", "on_error": "skip", "format": "text"}, {})
    from_flags = PerturbSettings.from_sources(
        {}, {"epsilon": "3", "workers": 0, "chunk_size": 50, "oov": "drop", "on_error": "skip", "format": "text"})
    assert from_config == from_flags
    assert from_config.epsilon == 3.0 and from_config.oov is OovPolicy.DROP
    assert from_config.on_error is OnError.SKIP and from_config.format is Format.TEXT
    assert from_config.workers == 0 and from_config.effective_workers() == default_workers()


def test_flags_win_over_config_and_params_merge() -> None:
    s = PerturbSettings.from_sources({"epsilon": 1, "mechanism": "laplace", "params": {"a": 1, "b": 2}},
                                     {"epsilon": "5", "params": {"b": "3"}})
    assert s.epsilon == 5.0 and s.mechanism == "laplace" and s.params == {"a": 1, "b": "3"}


@pytest.mark.parametrize(("config", "needle"), [
    ({"epsilon": "many"}, "'epsilon' in c.toml must be a number"),
    ({"epsilon": 1, "workers": -1}, "at least 0"),
    ({"epsilon": 1, "workers": 1.5}, "'workers' in c.toml must be a whole number"),
    ({"epsilon": 1, "chunk_size": True}, "whole number"),
    ({"epsilon": 1, "oov": "hide"}, "must be one of mask, drop, keep"),
    ({"epsilon": 1, "on_error": 1}, "must be one of fail, skip, keep"),
    ({"epsilon": 1, "format": "csv"}, "must be one of jsonl, parquet, text"),
    ({"epsilon": 1, "field": "a..b"}, "dotted path"),
    ({"epsilon": 1, "params": 3}, "must be a table"),
    ({"epsilon": 1, "seed": "x"}, "unknown key(s) in c.toml: seed"),
    ({"mechanism": "laplace"}, "--epsilon is required"),
])
def test_wrong_values_are_one_line_usage_errors(config: dict, needle: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(UsageError) as info:
        PerturbSettings.from_sources(config, {}, config_name="c.toml")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(UsageError, match="--chunk-size must be at least 1"):
        PerturbSettings.from_sources({}, {"epsilon": 1, "chunk_size": 0})


def test_library_construction_is_validated_too() -> None:
    s = PerturbSettings(mechanism="laplace", epsilon=2, oov="keep", on_error="keep")  # type: ignore[arg-type]
    assert s.oov is OovPolicy.KEEP and s.on_error is OnError.KEEP and isinstance(s.epsilon, float)
    with pytest.raises(UsageError):
        PerturbSettings(mechanism="laplace", epsilon=2, workers=-3)


def test_config_files_that_cannot_be_read(tmp_path: Path) -> None:
    good = tmp_path / "ok.toml"
    good.write_text('epsilon = 2\n[params]\nk = 1\n')
    assert load_config(good) == {"epsilon": 2, "params": {"k": 1}}
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'mask_token = "caf\xe9"\n')
    with pytest.raises(UsageError, match="not UTF-8"):
        load_config(latin)
    broken = tmp_path / "broken.toml"
    broken.write_text("epsilon = = 2\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="is a directory"):
        load_config(tmp_path)


def test_output_contract_changes_with_every_output_shaping_setting() -> None:
    base = PerturbSettings(mechanism="laplace", epsilon=2)
    assert base.output_contract() == PerturbSettings(mechanism="laplace", epsilon=2, workers=7).output_contract()
    for change in ({"epsilon": 3.0}, {"field": "body"}, {"chunk_size": 10}, {"oov": OovPolicy.DROP},
                   {"params": {"k": 1}}, {"mask_token": "#"}):
        assert base.with_(**change).output_contract() != base.output_contract()
