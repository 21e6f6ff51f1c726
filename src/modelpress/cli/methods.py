"""The method commands, generated from one table: ``prune``, ``quantize``, ``factorize``, ``distill``.

Each runs one registered method of its family as a one-stage recipe (built in memory), so it
gets the same checks, engine, reports, artifact and resume as ``modelpress compress``. The
method names come from the registry when the command runs (``modelpress list 'prune.*'``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from ..core.errors import ModelpressError
from .common import DATA_HELP, MODEL_HELP, run_and_print


@dataclass(frozen=True)
class Family:
    command: str  # the CLI command
    prefix: str  # the registry family: methods are named PREFIX.NAME
    summary: str
    method_help: str
    set_help: str
    examples: str
    train_help: str = "fine-tune epochs after the method (0: none)"
    default_method: str | None = None  # None: the method argument is required
    train_option: str = "--finetune"
    train_default: float = 0
    data_help: str = DATA_HELP
    teacher: bool = False  # takes --teacher


FAMILIES = (
    Family("prune", "prune", "Prune a model with one method and report before/after (a one-stage recipe).",
           "pruning method, e.g. magnitude, channels, nm (see modelpress list 'prune.*')",
           "config field, e.g. sparsity=0.9 or schedule.kind=polynomial",
           "modelpress prune magnitude -m lenet5 --set sparsity=0.9 --set schedule.kind=polynomial --finetune 3 "
           "-o runs/p · modelpress prune channels -m resnet_small --set target_macs_reduction=0.5 --finetune 3 "
           "-o runs/c",
           train_help="fine-tune epochs after/while pruning"),
    Family("quantize", "quant", "Quantize a model with one method and report before/after (a one-stage recipe).",
           "quantization method, e.g. static_int8, dynamic_int8, weight_only, qat, adaround, kmeans "
           "(see modelpress list 'quant.*')",
           "config field, e.g. bits=4 or observer=percentile",
           "modelpress quantize static_int8 -m lenet5 --set observer=percentile -o runs/q · "
           "modelpress quantize weight_only -m resnet_small --set bits=4 -o runs/w4 · "
           "modelpress quantize qat -m lenet5 --set weight_bits=4 --finetune 2 -o runs/qat · "
           "modelpress quantize dynamic_int8 -m minilm -d sts -o runs/d",
           train_help="training epochs (QAT) or fine-tune after", data_help=DATA_HELP + " (calibration / QAT data)"),
    Family("factorize", "lowrank", "Replace layers by low-rank factors (SVD, Tucker-2, CP) and report before/after "
           "(a one-stage recipe).",
           "low-rank method: svd, tucker, cp (see modelpress list 'lowrank.*')",
           "config field, e.g. energy=0.9 or rank_ratio=0.5",
           "modelpress factorize svd -m lenet5 --set param_ratio=0.5 --finetune 3 -o runs/svd · "
           "modelpress factorize tucker -m resnet_small --set rank_ratio=0.5 --finetune 3 -o runs/tucker",
           train_help="fine-tune epochs after factorizing"),
    Family("distill", "distill", "Train a student by distillation (offline KD, self, mutual, quantization-aware or "
           "a shallower copy), report before/after.",
           "kd (from a teacher), self (deeper layers teach exit heads), mutual (two students), "
           "qat (float model teaches its QAT copy), shallow (the blocks holding the output best, taught by the model)",
           "config field, e.g. T=4 or alpha=0.9",
           "modelpress distill -m small.py:build -t runs/base/model.safetensors --set T=4 -o runs/kd · "
           "modelpress distill shallow -m hf:my-encoder -d sentences:my.txt --set keep=0.5 -o runs/half · "
           "modelpress distill self -m resnet_small --epochs 5 -o runs/self · "
           "modelpress distill qat -m runs/base/model.safetensors --set quant.weight_bits=4 -o runs/qad",
           train_help="training epochs", default_method="kd", train_option="--epochs", train_default=3,
           teacher=True),
)


def run_method_command(family: Family, method: str, model: str, data: str, run_dir: Path, sets: List[str],
                       epochs: float, lr: float, latency: bool, trust_remote_code: bool,
                       teacher: str | None = None):
    """Run one method as a one-stage recipe, so it gets the same reports, artifact and resume."""
    from ..engine import get_method
    from ..recipes.schema import Recipe, apply_overrides

    name = method if "." in method else f"{family.prefix}.{method}"
    get_method(name)  # unknown names fail here with the list of methods
    short = name.split(".")[-1]
    extra = []
    if family.teacher:
        if short == "kd" and not teacher:
            raise ModelpressError("modelpress distill kd needs a teacher",
                                  hint="pass --teacher path/to/teacher.safetensors")
        if teacher and short not in ("kd", "qat"):
            raise ModelpressError(f"modelpress distill {short} takes no --teacher",
                                  hint="kd and qat take a teacher; self and mutual train without one")
        if teacher:
            extra = [f"teacher={teacher}" if short == "kd" else f"kd.teacher={teacher}"]
    raw = {"version": 1, "name": name, "model": model, "data": data,
           "eval": {"latency": latency, "onnx": latency},
           "stages": [{"name": short, "method": name, "config": {}}]}
    if epochs > 0:
        raw["stages"][0]["finetune"] = {"epochs": epochs, "lr": lr}
    raw = apply_overrides(raw, [f"stage.1.{kv}" for kv in [*extra, *sets]])
    recipe = Recipe.from_dict(raw, where=f"modelpress {family.command} {short}")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_and_print(recipe, None, None, run_dir, trust_remote_code=trust_remote_code)


def make_command(family: Family):
    """A typer command for ``family`` (its parameters built from the family's table row)."""
    P = inspect.Parameter
    params = [
        P("method", P.POSITIONAL_OR_KEYWORD, annotation=str,
          default=typer.Argument(family.default_method or ..., help=family.method_help)),
        P("model", P.KEYWORD_ONLY, annotation=str,
          default=typer.Option(..., "--model", "-m", help=("the student: " if family.teacher else "") + MODEL_HELP)),
    ]
    if family.teacher:
        params.append(P("teacher", P.KEYWORD_ONLY, annotation=Optional[str],
                        default=typer.Option(None, "--teacher", "-t", help="teacher artifact or zoo name (trained!); "
                                             "needed by kd, optional for qat (default: the float model)")))
    params += [
        P("data", P.KEYWORD_ONLY, annotation=str,
          default=typer.Option("mnist5k", "--data", "-d", help=family.data_help)),
        P("run_dir", P.KEYWORD_ONLY, annotation=Path,
          default=typer.Option(..., "--out", "-o", help="run folder: artifact + report")),
        P("sets", P.KEYWORD_ONLY, annotation=List[str], default=typer.Option([], "--set", help=family.set_help)),
        P("epochs", P.KEYWORD_ONLY, annotation=float,
          default=typer.Option(family.train_default, family.train_option, help=family.train_help)),
        P("lr", P.KEYWORD_ONLY, annotation=float, default=typer.Option(1e-3, help="learning rate")),
        P("latency", P.KEYWORD_ONLY, annotation=bool,
          default=typer.Option(True, help="measure latency (eager and ONNX Runtime)")),
        P("trust_remote_code", P.KEYWORD_ONLY, annotation=bool,
          default=typer.Option(False, "--trust-remote-code", help="allow loading files that can run code")),
    ]

    def command(**kwargs):
        run_method_command(family, **kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__name__ = family.command
    command.__doc__ = f"{family.summary}\n\n[bold]Examples[/bold]: {family.examples}\n"
    return command


def register(app: typer.Typer) -> None:
    for family in FAMILIES:
        app.command(family.command)(make_command(family))
