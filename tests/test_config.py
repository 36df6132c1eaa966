import pytest

import calplug

from calplug import CALConfig, CALConfigError
from calplug.config import resolve_config


def test_defaults_match_the_paper():
    cfg = CALConfig()
    assert (cfg.alpha, cfg.beta, cfg.pool_window, cfg.pool_scope) == (1.0, 5.0, 3, "flat")
    assert cfg.contrast == "drop"
    faithful = CALConfig.faithful()
    assert (faithful.contrast, faithful.pool_scope) == ("mask", "flat")


def test_sources_dict_yaml_env_and_overrides(tmp_path, monkeypatch):
    assert resolve_config({"alpha": 0.5}).alpha == 0.5
    path = tmp_path / "cal.yaml"
    path.write_text("cal:\n  beta: 3.0\n  pool_window: 5\n")
    cfg = resolve_config(str(path))
    assert (cfg.beta, cfg.pool_window) == (3.0, 5)
    monkeypatch.setenv("CALPLUG_CONFIG", str(path))
    assert resolve_config().beta == 3.0
    assert resolve_config(None, beta=4.0).beta == 4.0  # keyword overrides win over the file
    assert resolve_config(CALConfig(alpha=2.0)).alpha == 2.0  # an explicit config beats the env


@pytest.mark.parametrize("kwargs, key", [
    ({"alpha": 6.0, "beta": 5.0}, "alpha"),
    ({"pool_window": 4}, "pool_window"),
    ({"pool_window": 0}, "pool_window"),
    ({"pool_window": -3}, "pool_window"),
    ({"pool_scope": "sequnce"}, "pool_scope"),
    ({"contrast": ""}, "contrast"),
    ({"mask_ratio": 1.5}, "mask_ratio"),
    ({"alpha": "1"}, "alpha"),
])
def test_invalid_values_name_the_key(kwargs, key):
    with pytest.raises(CALConfigError, match=key):
        CALConfig(**kwargs)


def test_unknown_key_has_did_you_mean(tmp_path):
    with pytest.raises(CALConfigError, match=r"unknown calplug setting 'pool_windw'.*Did you mean 'pool_window'"):
        resolve_config({"pool_windw": 3})
    with pytest.raises(CALConfigError, match=r"'betta'.*Did you mean 'beta'"):
        resolve_config(None, betta=2.0)
    path = tmp_path / "bad.yaml"
    path.write_text("alpah: 1.0\n")
    with pytest.raises(CALConfigError, match=r"bad.yaml.*'alpah'.*'alpha'"):
        resolve_config(path)


def test_unknown_contrast_lists_registered_ones_at_enable():
    """A config is plain data (plugins may register contrasts later); `enable` resolves the name
    once and refuses an unknown one, leaving the model as it was."""
    from calplug.testing import tiny_llava

    assert CALConfig(contrast="masc").contrast == "masc"
    model = tiny_llava(0)
    with pytest.raises(CALConfigError, match=r"Did you mean 'mask'.*Registered: .*drop.*mask"):
        calplug.enable(model, contrast="masc")
    assert not calplug.is_enabled(model)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(CALConfigError, match="does not exist"):
        resolve_config(str(tmp_path / "nope.yaml"))
