"""Commands that run recipes: ``compress`` and ``demo``."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional

import typer

from .common import DATA_HELP, MODEL_HELP, run_and_print

DEMO_RECIPE = "resnet-channels-kmeans"


def compress(recipe: str = typer.Option(..., "--recipe", "-r", help="recipe YAML file or built-in name"),
             model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
             data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
             run_dir: Path = typer.Option(..., "--out", "-o", help="run folder (created; a rerun resumes)"),
             overrides: List[str] = typer.Option([], "--set", help="override, e.g. stage.1.sparsity=0.8"),
             resume: bool = typer.Option(True, help="continue a run folder of the same recipe"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                    help="allow loading files that can run code")):
    """Run a recipe: every stage with progress, a checkpoint per stage, reports, final artifact.

    [bold]Examples[/bold]: modelpress compress -r lenet5-prune -o runs/a ·
    modelpress compress -r my.yaml -m my.py:build -d imagefolder:photos -o runs/b --set stage.1.sparsity=0.8
    """
    from ..recipes.schema import Recipe

    run_and_print(Recipe.load(recipe, overrides), model, data, run_dir, resume=resume,
                  trust_remote_code=trust_remote_code)


def demo(run_dir: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run folder (replaced)"),
         recipe: str = typer.Option(DEMO_RECIPE, help="built-in recipe to run")):
    """The built-in demo: a small ResNet on real MNIST digits made ~30x smaller and ~2x faster.

    Trains the baseline once (cached), removes channels (fewer MACs: faster on every runtime),
    then shares 4-bit weights (a much smaller file), and prints the before/after table with the
    reason for each change. About a minute on 2 cores.
    [bold]Example[/bold]: modelpress demo · modelpress demo --recipe lenet5-prune
    """
    from ..recipes.schema import Recipe

    loaded = Recipe.load(recipe)
    if (run_dir / "recipe.yaml").exists():
        shutil.rmtree(run_dir)  # the demo always starts fresh; only a folder holding a run is removed
    run_and_print(loaded, None, None, run_dir)


def register(app: typer.Typer) -> None:
    app.command()(compress)
    app.command()(demo)
