"""Issue 21: a recipe file cannot exhaust memory or time. YAML anchors/aliases, huge documents,
deep nesting and huge values are refused up front, with one short ConfigError line."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.core.errors import ConfigError
from modelpress.core.limits import MAX_DEPTH, check_yaml_events, load_yaml, read_json
from modelpress.recipes.schema import Recipe, apply_overrides

EXE = [sys.executable, "-m", "modelpress.cli"]


def alias_bomb(levels: int, fanout: int = 9) -> str:
    """The issue's recipe: ``scope.include`` an alias chain ``levels`` deep, ``fanout`` refs per level
    (8 levels x 9 = 43 million strings once expanded)."""
    lines = ["version: 1", "name: bomb", "x0: &a0 [\"conv1\"]"]
    for i in range(1, levels + 1):
        lines.append(f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]")
    lines += ["stages:", "  - method: prune.magnitude", f"    config: {{scope: {{include: *a{levels}}}}}"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [8, 9])
def test_the_alias_chain_fails_at_once_in_little_memory(tmp_path, levels):
    path = tmp_path / "r.yaml"
    path.write_text(alias_bomb(levels))
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="anchors and aliases are not allowed") as err:
        Recipe.load(path)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 100 << 20
    assert len(str(err.value)) < 200 and "line 3" in str(err.value)


def test_the_cli_refuses_it_in_one_line(tmp_path):
    (tmp_path / "r.yaml").write_text(alias_bomb(8))
    t = time.perf_counter()
    res = subprocess.run([*EXE, "compress", "-r", str(tmp_path / "r.yaml"), "-m", "lenet5", "-d", "mnist5k", "-o",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr) < 500 and "aliases are not allowed" in res.stderr
    assert time.perf_counter() - t < 30 and not (tmp_path / "run").exists()


def test_overrides_and_long_values_are_bounded(tmp_path):
    raw = {"version": 1, "stages": [{"method": "prune.magnitude"}]}
    with pytest.raises(ConfigError, match="aliases"):
        apply_overrides(raw, ["stage.1.scope.include=[&a [x, x], *a]"])
    big = "9" * 5_000_000  # a 5 MB number: the error quotes a few dozen characters of it
    (tmp_path / "r.yaml").write_text("version: 1\nstages:\n  - method: prune.magnitude\n"
                                     f"    config: {{sparsity: '{big}'}}\n")
    with pytest.raises(ConfigError) as err:
        Recipe.load(tmp_path / "r.yaml")
    assert "stages.0.config.sparsity" in str(err.value) and len(str(err.value)) < 400
    deep = "a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5)
    with pytest.raises(ConfigError, match="nested deeper"):
        load_yaml(deep, "deep.yaml")
    with pytest.raises(ConfigError, match="a value of 2,000,000 characters at stages"):
        load_yaml("stages: ['" + "x" * 2_000_000 + "']", "long.yaml")


def test_json_read_back_is_bounded(tmp_path):
    (tmp_path / "m.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="not valid JSON|deeper"):
        read_json(tmp_path / "m.json", "stage report")
    (tmp_path / "big.json").write_text(json.dumps({"x": "y" * 100}))
    with pytest.raises(ConfigError, match="bytes"):
        read_json(tmp_path / "big.json", "report", max_bytes=50)
    assert read_json(tmp_path / "big.json", "report") == {"x": "y" * 100}


# -- random alias graphs ------------------------------------------------------------------------
@st.composite
def alias_documents(draw):
    """A YAML document whose anchors form a random graph: each new node refers to earlier ones."""
    n = draw(st.integers(1, 12))
    lines = ["a0: &n0 [leaf]"]
    for i in range(1, n + 1):
        refs = draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=12))
        lines.append(f"a{i}: &n{i} [" + ", ".join(f"*n{r}" for r in refs) + "]")
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None)
@given(alias_documents())
def test_any_alias_graph_is_refused_fast_and_small(doc):
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml(doc, "doc.yaml")
    # 3 s: a loaded CI worker under tracemalloc took 1.2 s once; an exponential expansion takes far longer
    assert time.perf_counter() - t < 3.0 and tracemalloc.get_traced_memory()[1] < 100 << 20
    tracemalloc.stop()


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=40))
def test_documents_within_the_bounds_load_as_before(value):
    text = yaml.safe_dump(value)
    check_yaml_events(text, "doc.yaml")
    assert load_yaml(text, "doc.yaml") == yaml.safe_load(text)


def test_no_base_60_numbers_an_nm_pattern_stays_a_string():
    """YAML 1.1 reads ``2:4`` as 124 (base 60): ``--set pattern=2:4`` reached Wanda as an integer."""
    from modelpress.recipes.schema import apply_overrides

    assert load_yaml("p: 2:4\nt: 1:30.5\nn: 12\nx: 0.5\nh: 0x10\nb: yes", "t") == {
        "p": "2:4", "t": "1:30.5", "n": 12, "x": 0.5, "h": 16, "b": True}
    raw = apply_overrides({"version": 1, "stages": [{"method": "prune.wanda"}]}, ["stage.1.pattern=2:4"])
    assert raw["stages"][0]["config"]["pattern"] == "2:4"
