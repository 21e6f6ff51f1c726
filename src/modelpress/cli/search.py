"""``modelpress search``: the best compression within a budget, written as a recipe."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..core.errors import ModelpressError
from .common import DATA_HELP, MODEL_HELP, load_with_data, out


def search(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
           data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
           budget: str = typer.Option(..., "--budget", "-b",
                                      help="METRIC=VALUE: bytes=5000, macs=2e6 or latency=3.5 (ms)"),
           max_drop: float = typer.Option(1.0, "--max-drop", help="largest quality drop allowed, in points"),
           trials: int = typer.Option(20, "--trials", "-n", help="trials the study should reach in total"),
           run_dir: Path = typer.Option(..., "--out", "-o", help="search folder: study.db, trials/, best-recipe.yaml, "
                                                                 "trials.json, report.html"),
           space_file: Optional[Path] = typer.Option(
               None, "--space", help="YAML of SearchSpace fields (sparsity, bits, channels, rank, finetune, ...)"),
           sets: List[str] = typer.Option([], "--set", help="SearchSpace field, e.g. bits=[8,4] or channels=[0,0.5]"),
           storage: Optional[str] = typer.Option(None, "--storage", help="Optuna database URL shared by workers "
                                                                         "(default: sqlite in the search folder)"),
           study: Optional[str] = typer.Option(None, "--study",
                                               help="study name (workers sharing --storage use the same)"),
           runtime: str = typer.Option("eager", help="latency budget runtime: eager, onnxruntime, openvino "
                                                     "or litert (batch 1)"),
           batch_size: int = typer.Option(1, "--batch-size", help="latency budget batch size"),
           threads: int = typer.Option(1, help="latency budget threads"),
           seed: int = typer.Option(0, help="sampler and recipe seed"),
           trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                  help="allow loading files that can run code")):
    """Search per-layer sparsity, bits, channel and rank choices for the best model within a budget.

    Writes the best configuration as a recipe that `modelpress compress -r` reproduces, the
    Pareto front of all trials (trials.json, report.html). Rerun to resume; start more
    workers with the same --storage/--study to share the study.
    [bold]Examples[/bold]: modelpress search -m lenet5 --budget bytes=5000 --max-drop 0.5 -n 40 -o runs/s ·
    modelpress search -m resnet_small --budget latency=20 --batch-size 64 --set channels=[0,0.3,0.5]
    --set sparsity=null -o runs/l
    """
    from ..core.limits import MAX_YAML_BYTES, load_yaml, read_text_capped
    from ..recipes.schema import apply_overrides
    from ..search.space import Budget, SearchSpace
    from ..search.study import run_search

    raw = {}
    if space_file is not None:
        if not space_file.exists():
            raise ModelpressError(f"--space {space_file}: no such file")
        raw = load_yaml(read_text_capped(space_file, MAX_YAML_BYTES, "search space"), str(space_file)) or {}
    space = SearchSpace.from_dict(apply_overrides(raw, sets), where="search space")
    b = Budget.parse(budget, max_drop=max_drop, runtime=runtime, batch_size=batch_size, threads=threads)
    m, bundle = load_with_data(model, data, seed=seed, trust_remote_code=trust_remote_code)
    res = run_search(m, bundle, b, space, out=run_dir, trials=trials, storage=storage, study_name=study,
                     model_ref=model, data_ref=data, seed=seed)
    fmt = (lambda c: f"{c:.3f} ms") if b.metric == "latency" else (lambda c: f"{c:,.0f}")  # noqa: E731
    table = Table(title=f"Pareto front ({len(res.pareto)} of {len(res.trials)} trials)")
    for col in ("trial", "quality", "drop (pt)", b.metric, "within budget"):
        table.add_column(col, justify="right")
    for t in res.pareto:
        table.add_row(str(t["number"]) + (" (best)" if res.best and t["number"] == res.best["number"] else ""),
                      f"{t['quality']:.2f}", f"{t['drop']:+.2f}", fmt(t["cost"]), "yes" if t["feasible"] else "no")
    out.print(table)
    if res.best is None:
        raise ModelpressError("no trial completed", hint=f"see the failed trials in {run_dir / 'trials.json'}")
    verdict = "meets the budget" if res.met_budget else "does NOT meet the budget: no trial did; the closest is kept"
    typer.echo(f"best: trial {res.best['number']}, quality {res.best['quality']:.2f} (drop {res.best['drop']:.2f} pt), "
               f"{b.metric} {fmt(res.best['cost'])}; {verdict}\nrecipe: {run_dir / 'best-recipe.yaml'} "
               f"(modelpress compress -r {run_dir / 'best-recipe.yaml'} -o runs/best)")
    if not res.met_budget:
        raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    app.command()(search)
