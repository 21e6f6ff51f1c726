import pytest
import yaml

from modelpress import MagnitudePruning, ModelpressError, get_method, list_methods
from modelpress.core.errors import ConfigError


def test_invalid_value_names_field_range_and_value():
    with pytest.raises(ConfigError) as e:
        MagnitudePruning(sparsity=1.2)
    assert str(e.value) == "MagnitudePruning.sparsity: Input should be less than 1 (got 1.2)"
    assert e.value.hint


@pytest.mark.parametrize("kwargs, field", [({"sparsity": -0.1}, "sparsity"), ({"ranking": "x"}, "ranking"),
                                           ({"bogus": 1}, "bogus"), ({"layer_sparsity": {"a": 2.0}}, "layer_sparsity")])
def test_bad_configs_are_errors(kwargs, field):
    with pytest.raises(ModelpressError, match=field):
        MagnitudePruning(**kwargs)


@pytest.mark.parametrize("info", list_methods(), ids=lambda i: i.name)
def test_every_method_config_round_trips(info):
    cfg = info.config_cls()
    again = info.config_cls.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    assert get_method(cfg) is info and get_method(info.name) is info


def test_list_methods_pattern_and_unknown():
    assert [m.name for m in list_methods("prune.*")][0].startswith("prune.")
    assert list_methods("nothing.*") == []
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("prune.magnitudee")
