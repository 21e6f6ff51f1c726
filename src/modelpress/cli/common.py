"""What every command shares: consoles, option help, the report table, model and data resolution.

The command modules import what a command runs inside the command itself: ``modelpress --help``
and argument errors should not pay for importing torch.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from ..core.errors import ModelpressError

out = Console()
err_console = Console(stderr=True, soft_wrap=True)  # soft_wrap: an error stays one line, whatever the width

MODEL_HELP = "zoo name (lenet5, resnet_small, minilm, pylm ...), path/file.py:factory, HF model dir, or artifact"
DATA_HELP = ("dataset: mnist5k, digits, sts, sentences, pystdlib, pystdlib-tiny, mnist-idx:DIR, cifar10:DIR, "
             "imagefolder:DIR, csv:FILE, sts:PAIRS.tsv, sentences:FILE.txt[?pairs=PAIRS.tsv]")


def load_bundle(spec: str, seed: int = 0):
    from ..recipes.resolve import resolve_data

    return resolve_data(spec, seed)


def load(ref: str, bundle, *, seed: int = 0, train=None, trust_remote_code: bool = False):
    """The model ``ref`` names; a zoo name on labelled data means its trained baseline (cached)."""
    from ..recipes.resolve import resolve_model

    return resolve_model(ref, bundle, seed=seed, train=train, trust_remote_code=trust_remote_code)


def load_with_data(ref: str, data: str, *, seed: int = 0, train=None, trust_remote_code: bool = False):
    """``(model, bundle)``: the model ``ref`` names and the dataset ``data``, text tokenized by the
    model's own tokenizer (:func:`~modelpress.recipes.resolve.tokenized_for`)."""
    from ..recipes.resolve import resolve_model_and_data

    return resolve_model_and_data(ref, load_bundle(data, seed), seed=seed, train=train,
                                  trust_remote_code=trust_remote_code, spec=data)


def rows_table(rows: list[dict], title: str = "") -> Table:
    """Report rows as a terminal table: one line per metric, one column per model (baseline
    first); size, MAC and latency cells carry ``(baseline / value)x``."""
    from ..analysis.tables import row_cell, row_columns, speedup_of

    base = rows[0]
    table = Table(Column("metric", no_wrap=True), title=title or None)
    for r in rows:
        table.add_column(str(r.get("label", "")), justify="right", no_wrap=True)
    for key, header, kind in row_columns(rows):
        if key != "label":
            table.add_row(header, *[row_cell(r.get(key), base.get(key), kind, speedup_of(r, key)) for r in rows])
    if any(k.endswith("_speedup") for r in rows for k in r):
        table.caption = "latency ratios: each model timed interleaved with the baseline, 1 process"
    return table


def run_and_print(recipe, model: str | None, data: str | None, run_dir: Path, *, resume: bool = True,
                  trust_remote_code: bool = False):
    """Resolve the run (arguments win over the recipe's own ``model:``/``data:``), run it, print the table."""
    from ..analysis.speed_check import check_recipe
    from ..analysis.tables import explain_rows
    from ..core.progress import log
    from ..recipes.pipeline import run_recipe
    from ..recipes.resolve import resolve_run

    runtime = "onnxruntime" if recipe.eval.onnx else "eager"
    log(f"[dim]{check_recipe(recipe, runtime).summary()}[/dim]")
    run = resolve_run(recipe, model, data, trust_remote_code=trust_remote_code)
    result = run_recipe(recipe, run.model, run.data, out=run_dir, resume=resume)
    out.print(rows_table(result.rows, title=f"{recipe.name}: {run.model_ref} on {run.data.name}"))
    for line in explain_rows(result.rows, run.data.task.metrics):
        out.print(f"  {line}", highlight=False, soft_wrap=True)
    deployed = f", {result.deployed.path.name}" if result.deployed is not None else ""
    out.print(f"run folder: {run_dir}  (report.html, report.md, report.json, model.safetensors{deployed})")
    return result


def print_error(err: ModelpressError) -> None:
    # Text, not markup: messages quote user input that may contain [brackets]
    err_console.print(Text.assemble(("error:", "bold red"), " ", str(err)))
    if err.hint:
        err_console.print(Text.assemble(("hint:", "bold"), " ", err.hint))
