""""Will it be faster?": per-stage verdicts from the method, the runtime and the CPU's int8 instructions."""
from __future__ import annotations

import pytest

from modelpress import list_methods
from modelpress.analysis.speed_check import check_recipe, check_stage, has_int8_dot_product
from modelpress.core.errors import ConfigError
from modelpress.recipes.schema import Recipe

NO_VNNI = frozenset({"avx2", "fma"})
VNNI = frozenset({"avx2", "avx512_vnni"})


def recipe(*methods):
    return Recipe.from_dict({"version": 1, "stages": [{"method": m} for m in methods]})


def test_every_registered_method_has_a_rule():
    for info in list_methods():
        verdict, reason = check_stage(info.name, {}, "eager", NO_VNNI)
        assert verdict in ("yes", "no", "depends") and "no rule" not in reason, info.name


def test_unstructured_sparsity_and_low_bit_storage_are_not_faster():
    r = check_recipe(recipe("prune.magnitude", "quant.kmeans"), "eager", NO_VNNI)
    assert r.verdict == "no" and "dense kernels" in r.stages[0].reason
    assert "NOT faster" in r.summary()


def test_removing_channels_is_faster_and_static_int8_depends_on_the_cpu():
    assert check_recipe(recipe("prune.channels"), "eager").verdict == "yes"
    assert check_recipe(recipe("prune.channels", "quant.static_int8"), "onnxruntime", NO_VNNI).verdict == "depends"
    assert check_recipe(recipe("quant.static_int8"), "onnxruntime", VNNI).verdict == "yes"
    assert check_recipe(recipe("distill.shallow", "quant.dynamic_int8"), "eager").verdict == "yes"  # layers go
    assert check_recipe(recipe("distill.kd"), "eager").verdict == "no"
    assert check_recipe(recipe("quant.static_int8"), "eager", VNNI).verdict == "no"
    assert has_int8_dot_product(VNNI) and not has_int8_dot_product(NO_VNNI)


def test_unknown_runtime_is_a_clear_error():
    with pytest.raises(ConfigError, match="runtime 'tflite'"):
        check_recipe(recipe("prune.channels"), "tflite")
