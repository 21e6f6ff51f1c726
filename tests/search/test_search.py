"""Budgeted search: recipes from choices, Pareto front, best pick, reproducible best recipe, shared studies."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tinymodels import toy_bundle

from modelpress import compress
from modelpress.core.errors import ConfigError
from modelpress.recipes.schema import Recipe
from modelpress.search.space import Budget, SearchSpace, allowed_sparsities, build_recipe
from modelpress.search.study import pareto_front, pick_best, run_search

REPO = Path(__file__).resolve().parents[2]


def trained_mlp():
    from modelpress.core.training import TrainConfig, fit

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    return fit(m, toy_bundle().train, TrainConfig(epochs=8, lr=0.01)).eval()


SMALL = SearchSpace(sparsity=[0.0, 0.5, 0.8], bits=[8, 4], finetune={"epochs": 0.5, "lr": 0.005},
                    sensitivity_drop=None)


def test_budget_parsing_and_cost_keys():
    assert Budget.parse("bytes=5000", max_drop=0.5).cost_key == "artifact_bytes"
    assert Budget.parse("latency=2.5", batch_size=32, runtime="onnxruntime").cost_key == "ort_b32_ms"
    ov = Budget.parse("latency=2.5", runtime="openvino")
    assert ov.cost_key == "ov_b1_ms" and ov.eval_spec()["runtimes"] == ["openvino"] and ov.eval_spec()["onnx"]
    lite = Budget.parse("latency=1", runtime="litert")
    assert lite.cost_key == "litert_b1_ms" and not lite.eval_spec()["onnx"]
    assert Budget.parse("bytes=5000").eval_spec() == {"latency": False, "onnx": False, "runtimes": [],
                                                      "batch_sizes": [1], "threads": 1}
    with pytest.raises(ConfigError, match="METRIC=VALUE"):
        Budget.parse("size<5000")
    with pytest.raises(ConfigError, match="runtime: .*unknown runtime 'tvm'"):
        Budget.parse("latency=1", runtime="tvm")


def test_a_latency_budget_is_measured_in_its_runtime(tmp_path):
    pytest.importorskip("openvino")
    res = run_search(trained_mlp(), toy_bundle(), Budget(metric="latency", limit=1e9, max_drop=100, runtime="openvino"),
                     SearchSpace(sparsity=[0.0], bits=[8], finetune={"epochs": 0.1, "lr": 0.005},
                                 sensitivity_drop=None), out=tmp_path / "s", trials=1)
    assert res.baseline["row"]["ov_b1_ms"] > 0 and res.best["cost"] == res.best["row"]["ov_b1_ms"]


def test_space_rejects_out_of_range_choices():
    with pytest.raises(Exception, match="sparsity"):
        SearchSpace(sparsity=[0.5, 1.2])
    with pytest.raises(Exception, match="bits"):
        SearchSpace(bits=[0])


def test_build_recipe_is_a_valid_recipe_with_one_stage_per_knob():
    params = {"channels": 0.5, "rank": 0.5, "sparsity:0": 0.9, "sparsity:2": 0.0, "bits:0": 4, "bits:2": 8}
    raw = build_recipe(params, SearchSpace(), name="t", model="lenet5", data="mnist5k", eval_spec={"latency": False})
    recipe = Recipe.from_dict(raw)
    assert [s.method for s in recipe.stages] == ["prune.channels", "lowrank.svd", "prune.magnitude", "quant.kmeans"]
    assert recipe.stages[2].config["layer_sparsity"] == {"0": 0.9}  # 0.0 means: leave the layer alone
    assert recipe.stages[3].config["layer_bits"] == {"0": 4, "2": 8}
    assert recipe.stages[0].distill is not None and recipe.model == "lenet5"


def test_global_sparsity_and_bits_per_type_become_deep_compression_stages():
    params = {"sparsity": 0.95, "bits:type:Conv2d": 4, "bits:type:Linear": 2}
    raw = build_recipe(params, SearchSpace(ranking="global", bits_per="type"), name="t", model="lenet5",
                       data="mnist5k", eval_spec={"latency": False})
    prune_stage, share = Recipe.from_dict(raw).stages
    assert prune_stage.method == "prune.magnitude" and prune_stage.config["ranking"] == "global"
    assert prune_stage.config["sparsity"] == 0.95 and "layer_sparsity" not in prune_stage.config
    assert share.method == "quant.kmeans"
    assert share.config["layer_bits"] == {"type:Conv2d": 4, "type:Linear": 2}
    with pytest.raises(Exception, match="ranking"):
        SearchSpace(ranking="per-channel")
    with pytest.raises(Exception, match="bits_per"):
        SearchSpace(bits_per="model")


def test_search_with_global_sparsity_and_bits_per_type_suggests_one_choice_each(tmp_path):
    space = SearchSpace(sparsity=[0.5, 0.8], ranking="global", bits=[4, 3], bits_per="type",
                        finetune={"epochs": 0.5, "lr": 0.005})  # sensitivity_drop is ignored: no scan
    res = run_search(trained_mlp(), toy_bundle(), Budget(metric="bytes", limit=1e9, max_drop=100), space,
                     out=tmp_path / "g", trials=2)
    assert "curves" not in res.baseline
    for t in res.trials:
        assert t["state"] == "COMPLETE" and set(t["params"]) == {"sparsity", "bits:type:Linear"}
        prune_stage, share = t["recipe"]["stages"]
        assert prune_stage["config"]["ranking"] == "global"
        assert prune_stage["config"]["sparsity"] == t["params"]["sparsity"]
        assert share["config"]["layer_bits"] == {"type:Linear": t["params"]["bits:type:Linear"]}


def test_a_repeated_choice_reuses_the_result_instead_of_rerunning(tmp_path):
    space = SearchSpace(sparsity=[0.5], bits=[4], finetune={"epochs": 0.5, "lr": 0.005}, sensitivity_drop=None)
    res = run_search(trained_mlp(), toy_bundle(), Budget(metric="bytes", limit=1e9, max_drop=100), space,
                     out=tmp_path / "r", trials=3)  # one possible recipe: trials 1 and 2 repeat trial 0
    first, *repeats = res.trials
    assert "same_as" not in first and [t["same_as"] for t in repeats] == [0, 0]
    assert all((t["quality"], t["cost"]) == (first["quality"], first["cost"]) for t in repeats)
    assert sorted(p.name for p in (tmp_path / "r" / "trials").iterdir()) == ["0000"]  # run once
    assert res.best["number"] == 0


def test_sensitivity_caps_each_layers_choices():
    space = SearchSpace(sparsity=[0.0, 0.5, 0.9], sensitivity_drop=2.0)
    curves = {"a": [0.97, 0.96], "b": [0.97, 0.80]}  # accuracy at 50%, 90% (baseline 0.97)
    allowed = allowed_sparsities(space, curves, [0.5, 0.9], 0.97, ["a", "b"])
    assert allowed == {"a": [0.0, 0.5, 0.9], "b": [0.0, 0.5]}


def test_pareto_front_and_best_pick():
    trials = [{"number": i, "state": "COMPLETE", "quality": q, "cost": c, "drop": 97 - q}
              for i, (q, c) in enumerate([(97, 100), (96.8, 40), (96.0, 20), (95.0, 30), (96.9, 60)])]
    assert [t["number"] for t in pareto_front(trials)] == [2, 1, 4, 0]
    best, met = pick_best(trials, Budget(metric="bytes", limit=50, max_drop=0.5))
    assert met and best["number"] == 1
    best, met = pick_best(trials, Budget(metric="bytes", limit=10, max_drop=0.5))
    assert not met and best["number"] == 1  # nothing fits: the cheapest within the drop, said so


def test_search_finds_a_feasible_model_and_its_recipe_reproduces_it(tmp_path):
    model, bundle = trained_mlp(), toy_bundle()
    dense = run_search(model, bundle, Budget(metric="bytes", limit=1e9, max_drop=100), SMALL,
                       out=tmp_path / "probe", trials=1)
    budget = Budget(metric="bytes", limit=0.6 * dense.baseline["row"]["artifact_bytes"], max_drop=5.0)
    res = run_search(model, bundle, budget, SMALL, out=tmp_path / "s", trials=5, seed=0)
    assert len([t for t in res.trials if t["state"] == "COMPLETE"]) == 5
    assert res.met_budget and res.best["cost"] <= budget.limit and res.best["drop"] <= 5.0
    doc = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert doc["best"]["number"] == res.best["number"] and doc["pareto"]
    # the best recipe, rerun by compress, gives exactly the trial's numbers
    recipe = Recipe.from_dict(yaml.safe_load((tmp_path / "s" / "best-recipe.yaml").read_text()))
    again = compress(model, recipe, bundle, out=tmp_path / "again")
    assert again.final["artifact_bytes"] == res.best["row"]["artifact_bytes"]
    assert again.final["accuracy"] == pytest.approx(res.best["row"]["accuracy"], abs=0)
    # a second call resumes the study: no new trial is needed for the same total
    res2 = run_search(model, bundle, budget, SMALL, out=tmp_path / "s", trials=5)
    assert len(res2.trials) == 5 and res2.best["number"] == res.best["number"]


WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from search.test_search import SMALL, toy_bundle, trained_mlp
    from modelpress.search.space import Budget
    from modelpress.search.study import run_search
    run_search(trained_mlp(), toy_bundle(), Budget(metric="bytes", limit=1e9, max_drop=100), SMALL,
               out=sys.argv[1], trials=int(sys.argv[2]), storage=sys.argv[3], study_name="shared")
""")


def test_two_workers_share_one_sqlite_study(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MODELPRESS_PROGRESS": "0", "MODELPRESS_QUIET": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), "4", url], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    import optuna

    study = optuna.load_study(study_name="shared", storage=url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) >= 4 and len(set(numbers)) == len(numbers)
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) >= 2  # they did not all repeat one trial


def test_search_report_page_is_self_contained(tmp_path):
    from modelpress.analysis.report_html import render_search_html

    doc = {"budget": {"metric": "bytes", "limit": 50, "max_drop": 0.5}, "baseline": {"artifact_bytes": 100},
           "baseline_quality": 97.0, "met_budget": True, "best": {"number": 1}, "pareto": [2, 1],
           "trials": [{"number": i, "state": "COMPLETE", "quality": q, "cost": c, "drop": 97 - q,
                       "feasible": c <= 50 and 97 - q <= 0.5, "params": {"sparsity:fc": 0.9}}
                      for i, (q, c) in enumerate([(95.0, 30), (96.8, 40), (96.0, 20)])]
           + [{"number": 3, "state": "FAIL", "params": {}}]}
    page = render_search_html(doc)
    assert "https://" not in page and "http://" not in page and "data:image/png;base64," in page
    assert "trial 1, which meets the budget" in page and "3 completed trial(s) of 4" in page
    assert page.count("<tr>") == 3  # header + the two front trials


def test_a_trial_that_never_sent_a_heartbeat_is_failed_and_retried(tmp_path):
    """A worker killed between starting a trial and its first heartbeat: Optuna alone left it RUNNING."""
    import time

    import optuna

    from modelpress.search.study import _storage

    storage = _storage(None, tmp_path, heartbeat=(1, 1))
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"])
    trial = study.ask({"sparsity": optuna.distributions.CategoricalDistribution([0.5, 0.9])})  # RUNNING, no beat
    assert storage._get_stale_trial_ids(study._study_id) == []  # within the grace period: maybe still alive
    time.sleep(1.5)
    optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state.name for t in study.trials}
    assert states[trial.number] == "FAIL" and list(states.values()).count("WAITING") == 1  # retried once


def test_workers_sharing_a_study_propose_different_trials_and_one_worker_stays_reproducible():
    """Each worker builds its own sampler with the search's seed; trial randomness comes from (seed,
    trial number), so two workers asking at once do not get the same choices (they did: 5 of 11
    trials of a 2-worker study were duplicates), and a rerun of one worker proposes the same trials."""
    import optuna

    from modelpress.search.study import _sampler


    def run(workers: int) -> list[dict]:
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=_sampler(0))
        samplers = [_sampler(0) for _ in range(workers)]
        out = []
        for step in range(3):
            asked = []
            for s in samplers:  # every worker asks before any tells: they run at once
                study.sampler = s
                trial = study.ask()
                asked.append(trial)
                out.append({f"x{i}": trial.suggest_categorical(f"x{i}", [0, 1, 2, 3, 4]) for i in range(4)})
            for trial in asked:
                study.tell(trial, [float(step), 1.0])
        return out

    two = run(2)
    assert all(two[i] != two[i + 1] for i in range(0, len(two), 2))  # concurrent trials differ
    assert run(1) == run(1)
