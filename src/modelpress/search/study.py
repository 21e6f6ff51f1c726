"""Budgeted compression search on Optuna (``modelpress search``).

Each trial turns its choices into a recipe (:func:`~.space.build_recipe`), runs it with the
recipe pipeline in its own run folder (``trials/NNNN/``) and records quality and cost. The
study is two-objective (quality up, cost down) with the budget as a constraint, so the sampler
(Optuna's TPE with constraints) learns where the feasible region is. Results, in ``out``:

* ``best-recipe.yaml``: the best feasible trial (highest quality within the budget and the
  allowed drop; ties: lower cost). ``modelpress compress -r best-recipe.yaml`` reruns it to the
  same result (same seed, same stages, each starting from the saved artifact of the last);
* ``trials.json``: every trial (choices, quality, cost, state) and the Pareto front of quality
  vs cost; ``report.html`` plots them (when the report module is installed).

The study lives in ``storage``: by default a SQLite file in ``out`` (``study.db``), so a killed
search resumes where it stopped when run again; a database URL (e.g. PostgreSQL) lets several
processes or machines add trials to one study. A trial that fails (a method error, NaN
training) is recorded as failed and the study goes on; a trial left running by a killed process
is failed on resume (heartbeats) and retried. A trial whose recipe repeats a completed one's
(a small categorical space makes the sampler propose some choices twice) reuses its result
instead of running it again (``same_as`` in ``trials.json``): recipes are deterministic.

When no trial meets the budget the search says so, and ``best-recipe.yaml`` holds the feasible-
drop trial with the lowest cost (``result.met_budget`` is False).
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import socket
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..analysis.analyze import analyze
from ..analysis.report_html import TradeoffPoint, render_search_html
from ..analysis.report_html import pareto_front as front_of
from ..artifact.checkpoint import artifact_size_of
from ..core.errors import ConfigError, ModelpressError
from ..core.io import write_json, write_text
from ..core.limits import read_json
from ..core.progress import log
from ..core.scope import type_matches
from ..pruning.magnitude import PRUNABLE
from ..pruning.sensitivity import SensitivityConfig, sensitivity_scan
from ..recipes.pipeline import run_recipe
from ..recipes.schema import Recipe
from ..tasks.base import DatasetBundle, Task
from .space import Budget, SearchSpace, allowed_sparsities, build_recipe


@dataclass
class SearchResult:
    """What a search found: the best trial (recipe + metrics), whether it meets the budget, all trials."""

    best: dict | None
    met_budget: bool
    trials: list[dict] = field(default_factory=list)
    pareto: list[dict] = field(default_factory=list)
    baseline: dict = field(default_factory=dict)
    out: Path | None = None


def quality_of(row: dict, task: Task) -> float:
    """The row's quality in points (:meth:`Task.points`): the task's primary metric x 100 (accuracy,
    Spearman ...), or minus a lower-is-better metric (perplexity)."""
    if row.get(task.primary) is None:
        raise ConfigError(f"the report row has no {task.primary} to search on")
    return task.points(row)


def pareto_front(points: list[dict], quality: str = "quality", cost: str = "cost") -> list[dict]:
    """The trials (dicts) not dominated on (``quality`` up, ``cost`` down), cheapest first;
    the same rule as the report's plots (:func:`modelpress.analysis.report_html.pareto_front`).

        >>> pts = [{"quality": 97, "cost": 10}, {"quality": 96, "cost": 5}, {"quality": 95, "cost": 8}]
        >>> [p["cost"] for p in pareto_front(pts)]
        [5, 10]
    """

    tagged = [TradeoffPoint(str(i), p[quality], size=p[cost]) for i, p in enumerate(points)]
    return [points[int(t.label)] for t in front_of(tagged, cost="size")]


def pick_best(trials: list[dict], budget: Budget) -> tuple[dict | None, bool]:
    """Highest quality among trials within the budget and the drop (ties: lower cost); if none,
    the lowest-cost trial within the drop, else the lowest-cost trial; and whether it met the budget."""
    done = [t for t in trials if t.get("state") == "COMPLETE"]
    feasible = [t for t in done if t["cost"] <= budget.limit and t["drop"] <= budget.max_drop]
    if feasible:
        return max(feasible, key=lambda t: (t["quality"], -t["cost"])), True
    within_drop = [t for t in done if t["drop"] <= budget.max_drop]
    pool = within_drop or done
    return (min(pool, key=lambda t: (t["cost"], -t["quality"])) if pool else None), False


WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _storage(storage: str | None, out: Path, heartbeat: tuple[int, int] = (30, 120)):
    """Optuna RDB storage (default: SQLite in ``out``) with heartbeats, so trials of a killed
    process are failed and retried once. Workers starting together may race to create the
    schema; a few retries settle it."""
    import time
    import warnings

    import optuna
    from sqlalchemy.exc import DBAPIError

    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return _heartbeat_storage()(
                    url, heartbeat_interval=int(heartbeat[0]), grace_period=int(heartbeat[1]),
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
        except DBAPIError:  # PostgreSQL: DuplicateTable / UniqueViolation when two workers create the schema
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)


@functools.lru_cache(maxsize=None)
def _heartbeat_storage() -> type:
    """Optuna's RDB storage that also fails a running trial which never sent a heartbeat once it started
    more than the grace period ago: its worker died between starting it and its first beat, and Optuna
    alone only fails trials whose heartbeat went stale, so such a trial stayed RUNNING for ever."""
    import optuna
    from optuna.storages._rdb import models

    class HeartbeatStorage(optuna.storages.RDBStorage):
        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            stale = super()._get_stale_trial_ids(study_id)
            grace = timedelta(seconds=self.grace_period or 2 * self.heartbeat_interval)
            now = datetime.now()  # the clock datetime_start was taken with (the worker's)
            session = self.scoped_session()
            try:
                running = session.query(models.TrialModel).filter(
                    models.TrialModel.study_id == study_id,
                    models.TrialModel.state == optuna.trial.TrialState.RUNNING).all()
                stale += [t.trial_id for t in running if not t.heartbeats and t.trial_id not in stale
                          and t.datetime_start is not None and now - t.datetime_start > grace]
            finally:
                self.scoped_session.remove()
            return stale

    return HeartbeatStorage


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and type_matches(m, PRUNABLE)]


def run_search(model: nn.Module, bundle: DatasetBundle, budget: Budget, space: SearchSpace | None = None, *,
               out: str | Path, trials: int = 20, storage: str | None = None, study_name: str | None = None,
               model_ref: str | None = None, data_ref: str | None = None, seed: int = 0,
               keep_trial_artifacts: bool = False, heartbeat: tuple[int, int] = (30, 120),
               enqueue: Sequence[dict] = ()) -> SearchResult:
    """Search ``space`` for the best compression of ``model`` on ``bundle`` under ``budget``.

    ``trials`` is the total the study should reach (a resumed or shared study counts the
    trials already finished). ``model_ref``/``data_ref`` are written into the recipes so the CLI
    can rerun them (the Python caller passes the same model and data to ``compress``).
    ``heartbeat``: ``(interval, grace)`` seconds: a running trial whose worker sent no heartbeat for
    ``grace`` seconds (the process was killed) is failed and retried once by the next worker to start a trial.
    ``enqueue``: trial parameters (``trials.json``'s ``params``) a new study runs first, in order, e.g. to
    rerun on one machine the trials a team of workers ran.
    """
    import optuna

    space = space or SearchSpace()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    eval_spec = budget.eval_spec()

    baseline_file = out / "baseline.json"
    if baseline_file.exists():
        base = read_json(baseline_file, "search baseline")
    else:
        base = _baseline(model, bundle, space, eval_spec, seed)
        write_json(baseline_file, base)
    base_quality = base["quality"]
    allowed = allowed_sparsities(space, base.get("curves"), base.get("sparsities", []), base_quality / 100,
                                 base["layers"])
    modules = dict(model.named_modules())
    layer_types = sorted({type(modules[n]).__name__ for n in base["layers"] if n in modules})

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params: dict[str, Any] = {}
        if space.channels:
            params["channels"] = _choose(trial, "channels", space.channels)
        if space.rank:
            params["rank"] = _choose(trial, "rank", space.rank)
        if space.sparsity and space.ranking == "global":
            params["sparsity"] = _choose(trial, "sparsity", space.sparsity)
        for layer, choices in allowed.items():
            if space.sparsity and space.ranking == "layer":
                params[f"sparsity:{layer}"] = _choose(trial, f"sparsity:{layer}", choices)
            if space.bits and space.bits_per == "layer":
                params[f"bits:{layer}"] = _choose(trial, f"bits:{layer}", space.bits)
        for layer_type in layer_types if space.bits and space.bits_per == "type" else []:
            params[f"bits:type:{layer_type}"] = _choose(trial, f"bits:type:{layer_type}", space.bits)
        raw = build_recipe(params, space, name=f"search-trial-{trial.number}", model=model_ref, data=data_ref,
                           eval_spec=eval_spec, seed=seed)
        trial.set_user_attr("recipe", raw)
        trial.set_user_attr("worker", WORKER)  # which machine and process ran it (workers share a database)
        twin = _same_recipe(trial.study, raw)
        if twin is not None:  # recipes are deterministic: the same stages give the same numbers
            log(f"search: trial {trial.number} repeats trial {twin.number}'s choices; its result is reused")
            trial.set_user_attr("same_as", twin.number)
            row = twin.user_attrs["row"]
        else:
            row = _run_trial(trial.number, raw)
        if budget.cost_key not in row:
            raise ConfigError(f"the trial's report has no {budget.cost_key!r} to compare with the budget")
        quality, cost = quality_of(row, bundle.task), float(row[budget.cost_key])
        drop = base_quality - quality
        trial.set_user_attr("row", {k: v for k, v in row.items() if isinstance(v, (int, float, str))})
        trial.set_user_attr("drop", drop)
        trial.set_constraint("budget", cost - budget.limit)  # <= 0: feasible
        trial.set_constraint("drop", drop - budget.max_drop)
        return quality, cost

    def _run_trial(number: int, raw: dict) -> dict:
        trial_dir = out / "trials" / f"{number:04d}"
        if trial_dir.exists():  # a retried trial starts clean
            shutil.rmtree(trial_dir)
        res = run_recipe(Recipe.from_dict(raw, where=f"trial {number}"), model=_copy(model), data=bundle,
                         out=trial_dir, resume=False)
        if not keep_trial_artifacts:
            for f in trial_dir.rglob("*.safetensors"):
                if f.parent.name != trial_dir.name or f.name != "model.safetensors":
                    f.unlink()
        return res.final

    sampler = _sampler(seed)
    study = optuna.create_study(storage=_storage(storage, out, heartbeat),
                                study_name=study_name or f"modelpress-{out.name}",
                                directions=["maximize", "minimize"], sampler=sampler, load_if_exists=True)
    for params in enqueue if not study.trials else ():  # a new study: repeated choices stay repeated
        study.enqueue_trial(dict(params))
    finished = len([t for t in study.trials if t.state.is_finished()])
    if finished < trials:
        log(f"search: {trials - finished} trial(s) to run ({finished} already in the study), budget "
            f"{budget.metric} <= {budget.limit:g}, drop <= {budget.max_drop:g} pt")
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(
            trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL))],
            catch=(ModelpressError, RuntimeError, ValueError), n_trials=trials - finished,
            show_progress_bar=False)
    return _summarise(study, budget, base, out)


def _sampler(seed: int):
    """TPE whose random numbers for a trial are drawn from ``(seed, trial number)``.

    One seeded sampler per worker would hand every worker the same sequence: two workers starting
    together would propose the same choices trial after trial (measured: 5 of 11 trials were
    duplicates with 2 workers) and half the machines would do no new work. Seeding each trial by
    its number keeps a single worker's search reproducible and gives concurrent trials different
    proposals."""
    import numpy as np
    import optuna

    class TrialSeededTPE(optuna.samplers.TPESampler):
        def before_trial(self, study, trial) -> None:
            super().before_trial(study, trial)
            state = np.random.SeedSequence([seed, trial.number]).generate_state(1)[0]
            for owner in (self, getattr(self, "_random_sampler", None)):
                rng = getattr(owner, "_rng", None)
                if rng is not None and hasattr(rng, "_rng"):  # Optuna's LazyRandomState (checked on 4.x-5.x)
                    rng._rng = np.random.RandomState(int(state))
                elif owner is self:
                    self.reseed_rng()  # another Optuna: per-worker randomness at least

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return TrialSeededTPE(seed=seed, n_startup_trials=8, multivariate=True, group=True)


def _same_recipe(study, raw: dict):
    """A completed trial of ``study`` whose recipe equals ``raw`` but for its name, or None."""
    import optuna

    def key(recipe: dict) -> dict:
        return {k: v for k, v in recipe.items() if k != "name"}

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "row" in t.user_attrs and key(t.user_attrs.get("recipe") or {}) == key(raw):
            return t
    return None


def _choose(trial, name: str, choices: list):
    """The trial's pick among ``choices`` (a single choice is fixed, not a search dimension)."""
    return trial.suggest_categorical(name, choices) if len(choices) > 1 else choices[0]


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _baseline(model: nn.Module, bundle: Any, space: SearchSpace, eval_spec: dict, seed: int) -> dict:
    """Quality and cost of the uncompressed model, its prunable layers and (optionally) their sensitivity."""
    model.eval()
    row = bundle.evaluate(model)
    inputs = bundle.example_inputs(1)
    rep = analyze(model, inputs, batch_sizes=tuple(eval_spec["batch_sizes"]), threads=eval_spec["threads"],
                  latency=eval_spec["latency"], onnx=eval_spec["onnx"], artifact_bytes=artifact_size_of(model),
                  runtimes=tuple(eval_spec["runtimes"]))
    row.update(rep.summary())
    base = {"row": {k: v for k, v in row.items() if isinstance(v, (int, float, str))},
            "quality": quality_of(row, bundle.task),
            "layers": _layers(model)}
    if (space.sparsity and space.ranking == "layer" and space.sensitivity_drop is not None
            and bundle.task.labelled):
        sens_cfg = SensitivityConfig(sparsities=sorted({s for s in space.sparsity if s > 0}), keep_first_last=False,
                                     max_batches=8)
        torch.manual_seed(seed)
        result = sensitivity_scan(model, bundle.test, sens_cfg)
        base.update(curves=result.curves, sparsities=list(result.sparsities))
    return base


def _summarise(study, budget: Budget, base: dict, out: Path) -> SearchResult:
    import optuna
    import yaml

    trials = []
    for t in study.trials:
        entry = {"number": t.number, "state": t.state.name, "params": t.params}
        if t.state == optuna.trial.TrialState.COMPLETE:
            quality, cost = t.values
            entry.update(quality=quality, cost=cost, drop=t.user_attrs.get("drop"), row=t.user_attrs.get("row"),
                         recipe=t.user_attrs.get("recipe"),
                         feasible=cost <= budget.limit and t.user_attrs.get("drop", math.inf) <= budget.max_drop)
            if "same_as" in t.user_attrs:
                entry["same_as"] = t.user_attrs["same_as"]
        trials.append(entry)
    done = [t for t in trials if t["state"] == "COMPLETE"]
    front = pareto_front(done)
    best, met = pick_best(trials, budget)
    doc = {"budget": budget.model_dump(), "baseline": base["row"], "baseline_quality": base["quality"],
           "best": None if best is None else {k: best[k] for k in ("number", "quality", "cost", "drop", "params")},
           "met_budget": met, "pareto": [t["number"] for t in front], "trials": trials}
    write_json(out / "trials.json", doc)
    try:

        write_text(out / "report.html", render_search_html(doc))
    except Exception as exc:  # a plotting problem must not lose the search's results
        log(f"[yellow]search: report.html not written ({exc})[/yellow]")
    if best is not None:
        write_text(out / "best-recipe.yaml", yaml.safe_dump(best["recipe"], sort_keys=False))
        verdict = "meets" if met else "does NOT meet"
        log(f"search: best trial {best['number']}: quality {best['quality']:.2f} (drop {best['drop']:.2f} pt), "
            f"{budget.metric} {best['cost']:,.4g} — {verdict} the budget ({budget.limit:,g}); "
            f"recipe: {out / 'best-recipe.yaml'}")
    else:
        log("search: no trial completed")
    return SearchResult(best=best, met_budget=met, trials=trials, pareto=front, baseline=base, out=out)
