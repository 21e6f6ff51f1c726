"""Commands that describe what modelpress has: ``list``, ``recipes``, ``speedcheck``."""
from __future__ import annotations

import sys
from typing import List, Optional

import typer
from rich.table import Column, Table

from .common import out


def list_cmd(pattern: str = typer.Argument("*", help="glob on method names, e.g. 'prune.*'"),
             models: bool = typer.Option(False, "--models", help="list zoo models and datasets instead")):
    """List registered compression methods (or zoo models and datasets).

    [bold]Examples[/bold]: modelpress list · modelpress list 'prune.*' · modelpress list --models
    """
    if models:
        from ..artifact.loading import SOURCES
        from ..tasks.datasets import list_datasets

        names = [n for _, src in SOURCES.items() if src.names for n in src.names()]
        out.print("[bold]models:[/bold] " + ", ".join(names))
        out.print("[bold]datasets:[/bold] " + ", ".join(list_datasets()))
        return
    from ..engine import list_methods

    table = Table("summary", "needs data", "trains", "structural", "layers")
    table.columns.insert(0, Column("method", no_wrap=True))
    for m in list_methods(pattern):
        table.add_row(m.name, m.summary, "yes" if m.needs_data else "", "yes" if m.needs_training else "",
                      "yes" if m.structural else "", ", ".join(m.layer_types) or "whole model")
    out.print(table)


def recipes(show: Optional[str] = typer.Option(None, "--show", help="print this built-in recipe")):
    """List built-in recipes, or print one (a starting point for your own).

    [bold]Examples[/bold]: modelpress recipes · modelpress recipes --show lenet5-prune > my.yaml
    """
    from ..recipes.schema import BUILTIN_DIR, Recipe, builtin_names

    if show:
        Recipe.load(show)  # validates the name
        sys.stdout.write((BUILTIN_DIR / f"{show}.yaml").read_text())
        return
    table = Table("recipe", "model", "data", "stages", "description")
    for name in builtin_names():
        r = Recipe.load(name)
        table.add_row(name, r.model or "", r.data or "", " -> ".join(s.name for s in r.stages), r.description)
    out.print(table)


def speedcheck(recipe: str = typer.Option(..., "--recipe", "-r", help="recipe YAML file or built-in name"),
               runtime: str = typer.Option("eager", help="eager (PyTorch) or onnxruntime"),
               overrides: List[str] = typer.Option([], "--set", help="override, e.g. stage.1.sparsity=0.8")):
    """Will it be faster? Predict, before compressing, whether a recipe's result runs faster on a runtime.

    Zeroed or low-bit weights make a model smaller, not faster, on dense CPU kernels; removed
    channels/heads and int8 kernels (where the CPU has them) remove work.
    [bold]Examples[/bold]: modelpress speedcheck -r lenet5-prune ·
    modelpress speedcheck -r my.yaml --runtime onnxruntime
    """
    from ..analysis.speed_check import check_recipe
    from ..recipes.schema import Recipe

    typer.echo(check_recipe(Recipe.load(recipe, overrides), runtime).summary())


def register(app: typer.Typer) -> None:
    app.command("list")(list_cmd)
    app.command()(recipes)
    app.command()(speedcheck)
