import pytest
from torch import nn

from modelpress.core.errors import ConfigError, ScopeError
from modelpress.core.scope import Scope, first_and_last


def model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))


def names(scope, m=None, **kw):
    return [n for n, _ in scope.resolve(m or model(), ("Linear", "Conv2d"), **kw)]


def test_include_by_name_regex_and_type():
    assert names(Scope(include=["2"])) == ["2"]
    assert names(Scope(include=["re:[02]"])) == ["0", "2"]
    assert names(Scope(include=[nn.Linear])) == ["4"]
    assert names(Scope(include=["type:Conv2d"], exclude=["0"])) == ["2"]


def test_default_exclude_unless_explicit():
    assert names(Scope(), default_exclude=first_and_last(model())) == ["2"]
    assert names(Scope(include=["0", "2"]), default_exclude=["0", "4"]) == ["0", "2"]


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(ScopeError, match="'conv9' matches no layer"):
        names(Scope(include=["conv9"]))
    with pytest.raises(ScopeError, match="matches no layer"):
        names(Scope(exclude=["re:fc.*"]))


def test_unsupported_layer_named_explicitly_is_an_error():
    with pytest.raises(ScopeError, match="ReLU, which this method cannot handle"):
        names(Scope(include=["1"]))


def test_invalid_regex_and_empty_selection():
    with pytest.raises(ConfigError, match="invalid regular expression"):
        Scope(include=["re:("])
    with pytest.raises(ScopeError, match="selects no"):
        names(Scope(exclude=["type:Conv2d", "type:Linear"]))


def test_scope_round_trips_types_as_strings():
    s = Scope(include=[nn.Conv2d, "re:x"])
    assert s.to_dict() == {"include": ["type:Conv2d", "re:x"], "exclude": []}
    assert Scope.from_dict(s.to_dict()) == s


def test_a_recurrent_stack_first_is_not_left_out_and_an_empty_default_scope_says_why():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 4)
            self.head = nn.Linear(4, 2)

    model = Recurrent()
    types = ("Linear", "RNNBase")
    assert first_and_last(model, types) == ["head"]
    assert [n for n, _ in Scope().resolve(model, types, default_exclude=first_and_last(model, types))] == ["rnn"]
    with pytest.raises(ScopeError, match=r"left out by default: head") as err:
        Scope().resolve(model, ("Linear",), default_exclude=first_and_last(model, ("Linear",)))
    assert "keep_first_last" in err.value.hint
