import pytest

from modelpress.core.errors import ConfigError
from modelpress.recipes.schema import Recipe, apply_overrides, builtin_names

GOOD = {"version": 1, "name": "t", "stages": [
    {"name": "prune", "method": "prune.magnitude", "config": {"sparsity": 0.5}},
    {"method": "prune.magnitude", "config": {"sparsity": 0.6}, "finetune": {"epochs": 1}}]}


def fresh():
    import copy
    return copy.deepcopy(GOOD)


def test_valid_recipe_resolves_defaults_and_names():
    r = Recipe.from_dict(fresh())
    assert [s.name for s in r.stages] == ["prune", "magnitude"]
    d = r.to_dict()
    assert d["stages"][0]["config"]["ranking"] == "global"  # defaults filled in
    assert Recipe.from_dict(d).to_dict() == d  # resolved recipe round-trips


@pytest.mark.parametrize("mutate, path", [
    (lambda r: r.update(bogus=1), "recipe.bogus: unknown key"),
    (lambda r: r.update(version=2), "recipe.version"),
    (lambda r: r.update(stages=[]), "recipe.stages"),
    (lambda r: r["stages"][0].update(methd="x"), "recipe.stages.0.methd: unknown key"),
    (lambda r: r["stages"][1]["config"].update(sparsity=1.2), "recipe.stages.1.config.sparsity"),
    (lambda r: r["stages"][1]["config"].update(sparsityy=0.2), "recipe.stages.1.config.sparsityy: unknown key"),
    (lambda r: r["stages"][0].update(method="prune.nope"), "unknown method 'prune.nope'"),
    (lambda r: r["stages"][1].update(finetune={"epochs": -1}), "recipe.stages.1.finetune.epochs"),
    (lambda r: r["stages"][0].update(name="bad name!"), "recipe.stages.0.name"),
])
def test_bad_recipes_name_the_key_path(mutate, path):
    raw = fresh()
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        Recipe.from_dict(raw)
    assert path in str(e.value)


def test_non_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="a recipe is a mapping"):
        Recipe.from_dict([1, 2])
    p = tmp_path / "r.yaml"
    p.write_text("version: 1\nstages: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Recipe.load(p)
    with pytest.raises(ConfigError, match="neither a file nor a built-in"):
        Recipe.load(tmp_path / "missing.yaml")


def test_overrides_by_stage_number_name_and_top_level():
    raw = apply_overrides(fresh(), ["stage.1.sparsity=0.8", "stage.magnitude.finetune.lr=0.01", "seed=3",
                                    "stage.2.schedule.kind=polynomial"])
    r = Recipe.from_dict(raw)
    cfgs = r.method_configs()
    assert cfgs[0].sparsity == 0.8 and r.stages[1].finetune.lr == 0.01 and r.seed == 3
    assert cfgs[1].schedule.kind == "polynomial"


@pytest.mark.parametrize("item, msg", [("stage.3.sparsity=0.1", "no stage '3'"), ("sparsity", "not KEY=VALUE"),
                                       ("stage.1=3", "use stage.N.FIELD")])
def test_bad_overrides(item, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_overrides(fresh(), [item])


def test_override_value_out_of_range_is_reported_with_path(tmp_path):
    p = tmp_path / "r.yaml"
    import yaml
    p.write_text(yaml.safe_dump(fresh()))
    with pytest.raises(ConfigError, match=r"r.yaml.stages.0.config.sparsity"):
        Recipe.load(p, ["stage.1.sparsity=1.5"])


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_recipes_are_valid(name):
    r = Recipe.load(name)
    assert r.stages and r.model and r.data


def test_builtin_recipe_headers_state_no_speed():
    """Speed is what `compress` measures on the user's machine; a header states what a recipe does and
    its quality, never a speed-up copied from another machine."""
    import re

    from modelpress.recipes.schema import BUILTIN_DIR

    speed = re.compile(r"\d(\.\d+)?x (faster|slower)|\d+(\.\d+)? ms\b|\b(ORT|eager|OpenVINO)\b[^\n]*\d(\.\d+)?x")
    for path in BUILTIN_DIR.glob("*.yaml"):
        header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        assert not speed.search(header), f"{path.name}: {speed.search(header).group(0)!r}"
