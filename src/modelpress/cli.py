"""The ``modelpress`` command line (typer + rich).

Every command has ``--help`` with examples. Errors print one line with the cause and a
hint, and exit with status 2 (1 for an unexpected crash, with the traceback).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from .core.errors import ModelpressError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Make trained PyTorch models smaller and faster, and measure it.\n\n"
                       "Start with [bold]modelpress demo[/bold]; see [bold]modelpress COMMAND --help[/bold].")
out = Console()
_err = Console(stderr=True, soft_wrap=True)  # soft_wrap: an error stays one line, whatever the width

MODEL_HELP = "zoo name (lenet5, resnet_small, minilm ...), path/file.py:factory, HF model dir, or artifact"
DATA_HELP = "dataset: mnist5k, digits, sts, mnist-idx:DIR, cifar10:DIR, imagefolder:DIR"


def _load_bundle(spec: str, seed: int = 0):
    from .zoo.datasets import load_dataset

    return load_dataset(spec, seed=seed)


def _resolve_model(ref: str, bundle, *, seed: int = 0, train=None, trust_remote_code: bool = False):
    """A zoo name on a classification dataset means its trained baseline (cached)."""
    from .core.loading import load_model
    from .zoo.models import list_models

    if ref in list_models() and bundle is not None and bundle.task == "classification":
        from .zoo.baselines import get_baseline

        return get_baseline(ref, bundle, seed=seed, train=train)[0]
    return load_model(ref, trust_remote_code=trust_remote_code)


def rows_table(rows: list[dict], title: str = "") -> Table:
    """Report rows as a terminal table: one line per metric, one column per model (baseline
    first); size, MAC and latency cells carry ``(baseline / value)x``."""
    from .analysis.tables import row_cell, row_columns, speedup_of

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


# -- commands ------------------------------------------------------------------------
@app.command("list")
def list_cmd(pattern: str = typer.Argument("*", help="glob on method names, e.g. 'prune.*'"),
             models: bool = typer.Option(False, "--models", help="list zoo models and datasets instead")):
    """List registered compression methods (or zoo models and datasets).

    [bold]Examples[/bold]: modelpress list · modelpress list 'prune.*' · modelpress list --models
    """
    if models:
        from .zoo.datasets import list_datasets
        from .zoo.models import list_models

        out.print("[bold]models:[/bold] " + ", ".join(list_models()))
        out.print("[bold]datasets:[/bold] " + ", ".join(list_datasets()))
        return
    from .core.registry import list_methods

    table = Table("summary", "needs data", "trains", "structural", "layers")
    table.columns.insert(0, Column("method", no_wrap=True))
    for m in list_methods(pattern):
        table.add_row(m.name, m.summary, "yes" if m.needs_data else "", "yes" if m.needs_training else "",
                      "yes" if m.structural else "", ", ".join(m.layer_types))
    out.print(table)


@app.command()
def train(model: str = typer.Argument(..., help="zoo model name or path/file.py:factory"),
          data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
          epochs: float = typer.Option(6, help="passes over the training split"),
          lr: float = typer.Option(2e-3, help="learning rate (Adam, cosine decay)"),
          seed: int = typer.Option(0), output: Optional[Path] = typer.Option(None, "--out", "-o",
                                                                            help="artifact path (default: the baseline cache)")):
    """Train a baseline classifier with a progress bar and save it as an artifact.

    [bold]Examples[/bold]: modelpress train lenet5 --data mnist5k · modelpress train my.py:build --data digits -o base.safetensors
    """
    from .core.loading import load_model
    from .core.training import TrainConfig, evaluate_accuracy
    from .export.checkpoint import save_artifact
    from .zoo.baselines import get_baseline, train_model
    from .zoo.models import list_models

    bundle = _load_bundle(data, seed)
    cfg = TrainConfig(epochs=epochs, lr=lr)
    if model in list_models() and output is None:
        m, path = get_baseline(model, bundle, seed=seed, train=cfg, retrain=True)
    else:
        m = train_model(load_model(model), bundle, cfg, seed)
        path = save_artifact(m, output or Path(f"{model.split(':')[-1]}-{data.split(':')[0]}.safetensors"),
                             meta={"dataset": bundle.name, "seed": seed, "train": cfg.to_dict()})
    out.print(f"test accuracy {evaluate_accuracy(m, bundle.test):.4f}; saved to {path}")


@app.command()
def evaluate(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
             data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
             reference: Optional[str] = typer.Option(None, help="reference model for embedding fidelity"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Report accuracy (classification) or Spearman + fidelity (sentence embeddings).

    [bold]Examples[/bold]: modelpress evaluate -m runs/demo/model.safetensors -d mnist5k · modelpress evaluate -m minilm -d sts
    """
    from .analysis.quality import evaluate_quality

    bundle = _load_bundle(data)
    m = _resolve_model(model, bundle, trust_remote_code=trust_remote_code)
    ref = _resolve_model(reference, bundle, trust_remote_code=trust_remote_code) if reference else None
    metrics = evaluate_quality(m, bundle, reference=ref)
    out.print(json.dumps(metrics, indent=2))


@app.command()
def analyze(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
            data: str = typer.Option("mnist5k", "--data", "-d", help="dataset giving the example input"),
            batch_sizes: str = typer.Option("1,64", help="comma-separated batch sizes for latency"),
            threads: int = typer.Option(1, help="CPU threads for latency measurement"),
            onnx: bool = typer.Option(True, help="also measure ONNX Runtime latency"),
            layers: int = typer.Option(10, help="show the N layers with the most MACs (0: none)"),
            json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON here"),
            md_out: Optional[Path] = typer.Option(None, "--markdown", help="write the report as Markdown here"),
            trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Parameters, MACs per layer, bytes on disk, peak memory and latency (PyTorch and ONNX Runtime).

    [bold]Examples[/bold]: modelpress analyze -m lenet5 · modelpress analyze -m runs/demo/model.safetensors --json a.json
    """
    from .analysis.analyze import analyze as run_analyze
    from .analysis.tables import to_markdown, to_rich_table
    from .core.io import write_json, write_text
    from .export.checkpoint import artifact_size_of
    from .recipes.pipeline import example_inputs

    bundle = _load_bundle(data)
    m = _resolve_model(model, bundle, trust_remote_code=trust_remote_code)
    p = Path(model)
    size = p.stat().st_size if p.is_file() else artifact_size_of(m)
    bs = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    report = run_analyze(m, example_inputs(bundle, 1), batch_sizes=bs, threads=threads, onnx=onnx,
                         artifact_bytes=size)
    out.print(to_rich_table({model: report}, title=model))
    if layers and report.macs_by_layer:
        total = report.macs_total or 1
        table = Table("layer", Column("MACs", justify="right"), Column("share", justify="right"),
                      title=f"MACs per layer (top {layers})")
        for name, macs in sorted(report.macs_by_layer.items(), key=lambda kv: -kv[1])[:layers]:
            table.add_row(name, f"{macs:,}", f"{100 * macs / total:.1f}%")
        out.print(table)
    if json_out:
        write_json(json_out, report.to_dict())
    if md_out:
        write_text(md_out, to_markdown({model: report}))


@app.command()
def recipes(show: Optional[str] = typer.Option(None, "--show", help="print this built-in recipe")):
    """List built-in recipes, or print one (a starting point for your own).

    [bold]Examples[/bold]: modelpress recipes · modelpress recipes --show lenet5-prune > my.yaml
    """
    from .recipes.schema import BUILTIN_DIR, Recipe, builtin_names

    if show:
        Recipe.load(show)  # validates the name
        sys.stdout.write((BUILTIN_DIR / f"{show}.yaml").read_text())
        return
    table = Table("recipe", "model", "data", "stages", "description")
    for name in builtin_names():
        r = Recipe.load(name)
        table.add_row(name, r.model or "", r.data or "", " -> ".join(s.name for s in r.stages), r.description)
    out.print(table)


def _run_compress(recipe_ref: str, model: Optional[str], data: Optional[str], run_dir: Path,
                  overrides: List[str], resume: bool, trust_remote_code: bool):
    from .recipes.pipeline import run_recipe
    from .recipes.schema import Recipe

    recipe = Recipe.load(recipe_ref, overrides)
    model_ref = model or recipe.model
    data_ref = data or recipe.data
    if not model_ref or not data_ref:
        raise ModelpressError("the recipe names no model/data and none was given",
                              hint="pass --model and --data")
    from .analysis.speed_check import check_recipe
    from .core.progress import log

    runtime = "onnxruntime" if recipe.eval.onnx else "eager"
    log(f"[dim]{check_recipe(recipe, runtime).summary()}[/dim]")
    bundle = _load_bundle(data_ref, recipe.seed)
    m = _resolve_model(model_ref, bundle, seed=recipe.seed, train=recipe.baseline.train,
                       trust_remote_code=trust_remote_code)
    result = run_recipe(recipe, m, bundle, out=run_dir, resume=resume)
    out.print(rows_table(result.rows, title=f"{recipe.name}: {model_ref} on {bundle.name}"))
    out.print(f"run folder: {run_dir}  (report.html, report.md, report.json, model.safetensors)")
    return result


@app.command()
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
    _run_compress(recipe, model, data, run_dir, overrides, resume, trust_remote_code)


@app.command()
def speedcheck(recipe: str = typer.Option(..., "--recipe", "-r", help="recipe YAML file or built-in name"),
               runtime: str = typer.Option("eager", help="eager (PyTorch) or onnxruntime"),
               overrides: List[str] = typer.Option([], "--set", help="override, e.g. stage.1.sparsity=0.8")):
    """Will it be faster? Predict, before compressing, whether a recipe's result runs faster on a runtime.

    Zeroed or low-bit weights make a model smaller, not faster, on dense CPU kernels; removed
    channels/heads and int8 kernels (where the CPU has them) remove work.
    [bold]Examples[/bold]: modelpress speedcheck -r lenet5-prune · modelpress speedcheck -r my.yaml --runtime onnxruntime
    """
    from .analysis.speed_check import check_recipe
    from .recipes.schema import Recipe

    result = check_recipe(Recipe.load(recipe, overrides), runtime)
    typer.echo(result.summary())


def _method_command(family: str, method: str, model: str, data: str, run_dir: Path, sets: List[str],
                    finetune_epochs: float, lr: float, latency: bool, trust_remote_code: bool):
    """Run one method as a one-stage recipe, so it gets the same reports, artifact and resume."""
    import yaml

    from .core.registry import get_method

    name = method if "." in method else f"{family}.{method}"
    get_method(name)  # unknown names fail here with the list of methods
    raw = {"version": 1, "name": f"{name}", "model": model, "data": data,
           "eval": {"latency": latency, "onnx": latency},
           "stages": [{"name": name.split(".")[-1], "method": name, "config": {}}]}
    if finetune_epochs > 0:
        raw["stages"][0]["finetune"] = {"epochs": finetune_epochs, "lr": lr}
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = run_dir / "input-recipe.yaml"
    from .core.io import write_text
    write_text(recipe_path, yaml.safe_dump(raw, sort_keys=False))
    overrides = [f"stage.1.{kv}" for kv in sets]
    _run_compress(str(recipe_path), None, None, run_dir, overrides, True, trust_remote_code)


@app.command()
def prune(method: str = typer.Argument(..., help="pruning method, e.g. magnitude, channels, nm (see modelpress list 'prune.*')"),
          model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
          data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
          run_dir: Path = typer.Option(..., "--out", "-o", help="run folder: artifact + report"),
          sets: List[str] = typer.Option([], "--set", help="config field, e.g. sparsity=0.9 or schedule.kind=polynomial"),
          finetune_epochs: float = typer.Option(0, "--finetune", help="fine-tune epochs after/while pruning"),
          lr: float = typer.Option(1e-3, help="fine-tune learning rate"),
          latency: bool = typer.Option(True, help="measure latency (eager and ONNX Runtime)"),
          trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Prune a model with one method and report before/after (a one-stage recipe).

    [bold]Examples[/bold]: modelpress prune magnitude -m lenet5 --set sparsity=0.9 --set schedule.kind=polynomial --finetune 3 -o runs/p ·
    modelpress prune channels -m resnet_small --set target_macs_reduction=0.5 --finetune 3 -o runs/c
    """
    _method_command("prune", method, model, data, run_dir, sets, finetune_epochs, lr, latency, trust_remote_code)


@app.command()
def quantize(method: str = typer.Argument(..., help="quantization method, e.g. static_int8, dynamic_int8, weight_only, "
                                                     "qat, adaround, kmeans (see modelpress list 'quant.*')"),
             model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
             data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP + " (calibration / QAT data)"),
             run_dir: Path = typer.Option(..., "--out", "-o", help="run folder: artifact + report"),
             sets: List[str] = typer.Option([], "--set", help="config field, e.g. bits=4 or observer=percentile"),
             finetune_epochs: float = typer.Option(0, "--finetune", help="training epochs (QAT) or fine-tune after"),
             lr: float = typer.Option(1e-3, help="training learning rate"),
             latency: bool = typer.Option(True, help="measure latency (eager and ONNX Runtime)"),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Quantize a model with one method and report before/after (a one-stage recipe).

    [bold]Examples[/bold]: modelpress quantize static_int8 -m lenet5 --set observer=percentile -o runs/q ·
    modelpress quantize weight_only -m resnet_small --set bits=4 -o runs/w4 ·
    modelpress quantize qat -m lenet5 --set weight_bits=4 --finetune 2 -o runs/qat ·
    modelpress quantize dynamic_int8 -m minilm -d sts -o runs/d
    """
    _method_command("quant", method, model, data, run_dir, sets, finetune_epochs, lr, latency, trust_remote_code)


@app.command()
def factorize(method: str = typer.Argument(..., help="low-rank method: svd, tucker, cp (see modelpress list 'lowrank.*')"),
              model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
              data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
              run_dir: Path = typer.Option(..., "--out", "-o", help="run folder: artifact + report"),
              sets: List[str] = typer.Option([], "--set", help="config field, e.g. energy=0.9 or rank_ratio=0.5"),
              finetune_epochs: float = typer.Option(0, "--finetune", help="fine-tune epochs after factorizing"),
              lr: float = typer.Option(1e-3, help="fine-tune learning rate"),
              latency: bool = typer.Option(True, help="measure latency (eager and ONNX Runtime)"),
              trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Replace layers by low-rank factors (SVD, Tucker-2, CP) and report before/after (a one-stage recipe).

    [bold]Examples[/bold]: modelpress factorize svd -m lenet5 --set param_ratio=0.5 --finetune 3 -o runs/svd ·
    modelpress factorize tucker -m resnet_small --set rank_ratio=0.5 --finetune 3 -o runs/tucker
    """
    _method_command("lowrank", method, model, data, run_dir, sets, finetune_epochs, lr, latency, trust_remote_code)


@app.command()
def distill(method: str = typer.Argument("kd", help="kd (from a teacher), self (deeper layers teach exit heads), "
                                                    "mutual (two students), qat (float model teaches its QAT copy)"),
            model: str = typer.Option(..., "--model", "-m", help="the student: " + MODEL_HELP),
            teacher: Optional[str] = typer.Option(None, "--teacher", "-t",
                                                  help="teacher artifact or zoo name (trained!); needed by kd, "
                                                       "optional for qat (default: the float model)"),
            data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
            run_dir: Path = typer.Option(..., "--out", "-o", help="run folder: artifact + report"),
            sets: List[str] = typer.Option([], "--set", help="config field, e.g. T=4 or alpha=0.9"),
            epochs: float = typer.Option(3, "--epochs", help="training epochs"),
            lr: float = typer.Option(1e-3, help="learning rate"),
            latency: bool = typer.Option(True, help="measure latency (eager and ONNX Runtime)"),
            trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Train a student by distillation (offline KD, self, mutual or quantization-aware), report before/after.

    [bold]Examples[/bold]: modelpress distill -m small.py:build -t runs/base/model.safetensors --set T=4 -o runs/kd ·
    modelpress distill self -m resnet_small --epochs 5 -o runs/self ·
    modelpress distill qat -m runs/base/model.safetensors --set quant.weight_bits=4 -o runs/qad
    """
    name = method.split(".")[-1]
    if name == "kd" and not teacher:
        raise ModelpressError("modelpress distill kd needs a teacher", hint="pass --teacher path/to/teacher.safetensors")
    if teacher and name not in ("kd", "qat"):
        raise ModelpressError(f"modelpress distill {name} takes no --teacher",
                              hint="kd and qat take a teacher; self and mutual train without one")
    extra = [] if not teacher else [f"teacher={teacher}" if name == "kd" else f"kd.teacher={teacher}"]
    _method_command("distill", method, model, data, run_dir, [*extra, *sets], epochs, lr, latency, trust_remote_code)


@app.command("export")
def export_cmd(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
               dest: Path = typer.Option(..., "--out", "-o", help="output file: .onnx or .safetensors"),
               data: str = typer.Option("mnist5k", "--data", "-d", help="dataset giving the example input"),
               fmt: str = typer.Option("auto", "--format", help="auto (from the suffix), onnx or artifact"),
               check: bool = typer.Option(True, help="run the exported ONNX model in ONNX Runtime and compare"),
               embedding_bits: int = typer.Option(8, "--embedding-bits",
                                                  help="dynamic int8 models: embedding tables as 8 or 4 bits "
                                                       "(0 keeps them float)"),
               trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Export a model for deployment: ONNX (int8 QDQ for statically quantized models, ONNX Runtime
    dynamic int8 for dynamically quantized ones) or a modelpress artifact.

    The artifact is safetensors + metadata (packed low-bit weights, codebooks, sparse tensors)
    and reloads in modelpress to the same outputs. ONNX files run in ONNX Runtime.
    [bold]Examples[/bold]: modelpress export -m runs/q/model.safetensors -o lenet5-int8.onnx ·
    modelpress export -m runs/p/model.safetensors -o small.safetensors
    """
    from .recipes.pipeline import example_inputs

    kind = fmt if fmt != "auto" else ("onnx" if dest.suffix == ".onnx" else "artifact")
    if kind not in ("onnx", "artifact"):
        raise ModelpressError(f"--format {fmt!r} is not known", hint="use auto, onnx or artifact")
    bundle = _load_bundle(data)
    m = _resolve_model(model, bundle, trust_remote_code=trust_remote_code)
    if kind == "artifact":
        from .export.checkpoint import save_artifact

        path = save_artifact(m, dest)
        out.print(f"wrote {path} ({path.stat().st_size:,} bytes)")
        return
    from .export.deploy import export_deployable

    path, note = export_deployable(m, example_inputs(bundle, 1), dest, check=check,
                                   embedding_bits=embedding_bits or None)
    out.print(f"wrote {path} ({path.stat().st_size:,} bytes){'; ' + note if note else ''}")


@app.command()
def sensitivity(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
                data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
                out_dir: Path = typer.Option(Path("sensitivity"), "--out", "-o", help="folder for the JSON, PNG and report.html"),
                sparsities: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="comma-separated"),
                metric: str = typer.Option("accuracy", help="accuracy or loss"),
                target: Optional[float] = typer.Option(None, help="also allocate per-layer sparsity for this global target"),
                trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Per-layer sensitivity: accuracy (or loss) when pruning one layer at a time, as a table and a plot.

    With --target, turns the curves into per-layer sparsities meeting that global target
    with the least loss (paste them into a recipe's layer_sparsity).
    [bold]Examples[/bold]: modelpress sensitivity -m lenet5 -o sens · modelpress sensitivity -m runs/a/model.safetensors --target 0.9
    """
    from .analysis.report_html import write_html_report
    from .core.io import write_json
    from .pruning.sensitivity import SensitivityConfig, sensitivity_scan

    bundle = _load_bundle(data)
    m = _resolve_model(model, bundle, trust_remote_code=trust_remote_code)
    cfg = SensitivityConfig.from_dict({"sparsities": [float(v) for v in sparsities.split(",") if v.strip()],
                                       "metric": metric}, where="sensitivity")
    result = sensitivity_scan(m, bundle.test, cfg)
    out.print(result.to_table())
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = result.to_dict()
    if target is not None:
        ratios = result.ratios_for_target(target)
        doc["ratios_for_target"] = {"target": target, "layer_sparsity": ratios}
        table = Table("layer", Column("sparsity", justify="right"), title=f"per-layer sparsity for {target:.0%} overall")
        for name, r in ratios.items():
            table.add_row(name, f"{r:.3f}")
        out.print(table)
    write_json(out_dir / "sensitivity.json", doc)
    png = result.plot(out_dir / "sensitivity.png")
    html = write_html_report(out_dir, f"sensitivity of {model} on {data}", [], [], sensitivity=doc)
    out.print(f"wrote {out_dir / 'sensitivity.json'}, {png} and {html}")


@app.command()
def search(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
           data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
           budget: str = typer.Option(..., "--budget", "-b", help="METRIC=VALUE: bytes=5000, macs=2e6 or latency=3.5 (ms)"),
           max_drop: float = typer.Option(1.0, "--max-drop", help="largest quality drop allowed, in points"),
           trials: int = typer.Option(20, "--trials", "-n", help="trials the study should reach in total"),
           run_dir: Path = typer.Option(..., "--out", "-o", help="search folder: study.db, trials/, best-recipe.yaml, "
                                                                 "trials.json, report.html"),
           space_file: Optional[Path] = typer.Option(None, "--space", help="YAML of SearchSpace fields "
                                                                           "(sparsity, bits, channels, rank, finetune, ...)"),
           sets: List[str] = typer.Option([], "--set", help="SearchSpace field, e.g. bits=[8,4] or channels=[0,0.5]"),
           storage: Optional[str] = typer.Option(None, "--storage", help="Optuna database URL shared by workers "
                                                                         "(default: sqlite in the search folder)"),
           study: Optional[str] = typer.Option(None, "--study", help="study name (workers sharing --storage use the same)"),
           runtime: str = typer.Option("eager", help="latency budget runtime: eager or onnxruntime"),
           batch_size: int = typer.Option(1, "--batch-size", help="latency budget batch size"),
           threads: int = typer.Option(1, help="latency budget threads"),
           seed: int = typer.Option(0, help="sampler and recipe seed"),
           trust_remote_code: bool = typer.Option(False, "--trust-remote-code")):
    """Search per-layer sparsity, bits, channel and rank choices for the best model within a budget.

    Writes the best configuration as a recipe that `modelpress compress -r` reproduces, the
    Pareto front of all trials (trials.json, report.html). Rerun to resume; start more
    workers with the same --storage/--study to share the study.
    [bold]Examples[/bold]: modelpress search -m lenet5 --budget bytes=5000 --max-drop 0.5 -n 40 -o runs/s ·
    modelpress search -m resnet_small --budget latency=20 --batch-size 64 --set channels=[0,0.3,0.5] --set sparsity=null -o runs/l
    """
    import yaml

    from .recipes.schema import apply_overrides
    from .search.space import Budget, SearchSpace
    from .search.study import run_search

    raw = {}
    if space_file is not None:
        if not space_file.exists():
            raise ModelpressError(f"--space {space_file}: no such file")
        raw = yaml.safe_load(space_file.read_text()) or {}
    space = SearchSpace.from_dict(apply_overrides(raw, sets), where="search space")
    b = Budget.parse(budget, max_drop=max_drop, runtime=runtime, batch_size=batch_size, threads=threads)
    bundle = _load_bundle(data, seed)
    m = _resolve_model(model, bundle, seed=seed, trust_remote_code=trust_remote_code)
    res = run_search(m, bundle, b, space, out=run_dir, trials=trials, storage=storage, study_name=study,
                     model_ref=model, data_ref=data, seed=seed)
    fmt = (lambda c: f"{c:.3f} ms") if b.metric == "latency" else (lambda c: f"{c:,.0f}")  # noqa: E731
    table = Table(title=f"Pareto front ({len(res.pareto)} of {len(res.trials)} trials)")
    for col in ("trial", "quality", "drop (pt)", b.metric, "within budget"):
        table.add_column(col, justify="right")
    for t in res.pareto:
        table.add_row(str(t["number"]) + (" (best)" if res.best and t["number"] == res.best["number"] else ""),
                      f"{t['quality']:.2f}", f"{t['drop']:+.2f}", fmt(t["cost"]), "yes" if t["feasible"] else "no")
    Console().print(table)
    if res.best is None:
        raise ModelpressError("no trial completed", hint=f"see the failed trials in {run_dir / 'trials.json'}")
    verdict = "meets the budget" if res.met_budget else "does NOT meet the budget: no trial did; the closest is kept"
    typer.echo(f"best: trial {res.best['number']}, quality {res.best['quality']:.2f} (drop {res.best['drop']:.2f} pt), "
               f"{b.metric} {fmt(res.best['cost'])}; {verdict}\nrecipe: {run_dir / 'best-recipe.yaml'} "
               f"(modelpress compress -r {run_dir / 'best-recipe.yaml'} -o runs/best)")
    if not res.met_budget:
        raise typer.Exit(3)


@app.command()
def demo(run_dir: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run folder (replaced)"),
         recipe: str = typer.Option("lenet5-prune", help="built-in recipe to run")):
    """The built-in demo: LeNet-5 on real MNIST digits, pruned 90%, before/after table.

    Trains the baseline once (cached), then compresses it with the built-in recipe.
    [bold]Example[/bold]: modelpress demo
    """
    if (run_dir / "recipe.yaml").exists():
        shutil.rmtree(run_dir)  # the demo always starts fresh; only a folder holding a run is removed
    _run_compress(recipe, None, None, run_dir, [], True, False)


INTERRUPTED = "interrupted (Ctrl-C); finished stages are saved, rerun the same command to resume"


def _print_error(err: ModelpressError) -> None:
    # Text, not markup: messages quote user input that may contain [brackets]
    _err.print(Text.assemble(("error:", "bold red"), " ", str(err)))
    if err.hint:
        _err.print(Text.assemble(("hint:", "bold"), " ", err.hint))


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("can't allocate memory", "not enough memory")))


def main() -> None:
    """Entry point. Exit status: 0 ok, 2 a ModelpressError (one ``error:`` line + ``hint:``),
    3 a search that met no budget, 130 Ctrl-C, 1 an unexpected crash (with its traceback)."""
    try:
        # Without standalone mode typer *returns* the status of typer.Exit, and of Ctrl-C (130),
        # instead of exiting: pass it on, or `search` over budget and Ctrl-C would exit 0.
        code = app(standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            if code == 130:
                _err.print(INTERRUPTED)
            sys.exit(code)
    except ModelpressError as err:
        _print_error(err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _err.print(INTERRUPTED)
        sys.exit(130)
    except Exception as exc:  # click usage errors are handled here too
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):  # click turns Ctrl-C into Abort
            if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
                _err.print(INTERRUPTED)
            sys.exit(130)
        if _out_of_memory(exc):
            from .core.errors import ResourceError

            err = ResourceError(f"out of memory ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                                hint="use smaller batch sizes (eval.batch_sizes, --batch-sizes) or a machine "
                                     "with more memory")
            _print_error(err)
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
