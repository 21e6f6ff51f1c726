"""Run a recipe stage by stage, measuring after each one, resumable from the run folder.

Run folder layout (``out``)::

    recipe.yaml                    the resolved recipe (all defaults filled in)
    baseline.safetensors           the uncompressed model as given
    stages/01-prune/model.safetensors, metrics.json   one folder per finished stage
    model.safetensors              the final artifact
    model.onnx                     with an ``export:`` section: the deployed file (.xml + .bin, .tflite
                                   for other runtimes), measured in the report's last row
    report.json, report.md         baseline vs every finished stage (rewritten after each)
    report.html                    the same with plots (self-contained, opens offline)

A stage counts as finished when its ``metrics.json`` exists (written last, atomically).
A rerun with the same recipe resumes after the last finished stage; each stage is seeded
from the recipe seed and its index, and every stage starts from the previous stage's
*saved* artifact, so a resumed run computes exactly what an uninterrupted run computes.
A run killed at any moment (even SIGKILL) leaves only whole files (see :mod:`modelpress.core.io`);
Ctrl-C stops it at once, and the stage in progress is recomputed by the rerun.

Before the first stage the model and data are checked, so that bad input fails in seconds
with one line, not hours later with a traceback: NaN/Inf weights or data, inputs that do not
fit the model, a stage-1 scope entry naming no layer, a latency benchmark too large for the
memory. Layers holding weights of a type a stage's method does not handle are left as they
are and listed in the stage's info (``unsupported_layers``) and on the log.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis.analyze import analyze, compare_deployed, compare_models, resize_batch
from ..analysis.latency import check_memory
from ..analysis.report_html import write_html_report
from ..analysis.tables import compare_rows
from ..artifact.checkpoint import save_artifact
from ..artifact.loading import load_artifact, load_model
from ..core.data import check_finite_data, check_finite_params, check_model_accepts
from ..core.errors import ConfigError, ModelpressError, ScopeError
from ..core.io import kill_point, remove_stale_temps, write_json, write_text
from ..core.limits import read_json
from ..core.progress import log
from ..core.scope import Scope
from ..distillation.kd import distillation_loss
from ..engine import MethodInputs, run_method
from ..export.deploy import export_deployable
from ..runtime import Deployed, get_runtime
from ..tasks.base import DatasetBundle
from .schema import Recipe


@dataclass
class RunResult:
    """What a recipe run produced: the final model, the report rows, the run folder and, with an
    ``export:`` section, the deployed file (its row is the last)."""

    model: nn.Module
    rows: list[dict]
    out: Path | None = None
    infos: list[dict] = field(default_factory=list)
    deployed: Deployed | None = None

    @property
    def baseline(self) -> dict:
        return self.rows[0]

    @property
    def final(self) -> dict:
        return self.rows[-1]


def _stage_loss(stage, baseline: nn.Module, task):
    """The training loss of a stage: distillation when it asks for it (teacher: the baseline unless
    named), else the task's (the labels; the baseline's outputs for tasks without labels)."""
    if stage.distill is not None:
        teacher = baseline
        if stage.distill.teacher:
            refs = [stage.distill.teacher] if isinstance(stage.distill.teacher, str) else stage.distill.teacher
            teacher = [load_model(r) for r in refs]
        return distillation_loss(teacher, stage.distill)
    return None if task.labelled else task.training_loss(reference=baseline)


def example_inputs(bundle: DatasetBundle, n: int = 1) -> Any:
    """The first ``n`` example inputs of a dataset bundle (as its task picks them)."""
    return bundle.example_inputs(n)


def measure(model: nn.Module, label: str, bundle: DatasetBundle, artifact: Path | None, recipe: Recipe,
            reference: nn.Module | None = None, baseline: nn.Module | None = None) -> dict:
    """One report row: quality, bytes on disk, parameters, MACs and latency.

    ``reference`` is what fidelity-style metrics compare with (the uncompressed model). With
    ``baseline``, latency is timed interleaved with the baseline in this process and the row
    carries the measured speed-ups (``eager_b64_speedup`` ...).
    """
    model.eval()
    row: dict[str, Any] = {"label": label}
    row.update(bundle.evaluate(model, reference=reference))
    ev = recipe.eval
    inputs = bundle.example_inputs(1)
    report = analyze(model, inputs, batch_sizes=tuple(ev.batch_sizes), threads=ev.threads,
                     latency=ev.latency and baseline is None, onnx=ev.onnx, repeats=ev.repeats,
                     artifact_bytes=artifact.stat().st_size if artifact else None, runtimes=tuple(ev.runtimes))
    row.update(report.summary())
    if ev.latency and baseline is not None:
        row.update(compare_models(baseline.eval(), model, inputs, batch_sizes=tuple(ev.batch_sizes),
                                  threads=ev.threads, onnx=ev.onnx, repeats=ev.repeats, runtimes=tuple(ev.runtimes)))
    return row


def _markdown(recipe: Recipe, rows: list[dict]) -> str:
    return (f"# modelpress report: {recipe.name}\n\n{recipe.description}\n\n"
            f"{compare_rows(rows)}\n\nBaseline = first row; ratios are baseline / row for sizes, "
            "MACs and latency (higher is better).\n")


def _write_reports(out: Path, recipe: Recipe, rows: list[dict], infos: list[dict]) -> None:
    write_json(out / "report.json", {"recipe": recipe.name, "rows": rows, "stages": infos})
    write_text(out / "report.md", _markdown(recipe, rows))
    try:
        write_html_report(out, recipe.name, rows, infos, description=recipe.description)
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not cost the finished stage
        log(f"[yellow]warning:[/yellow] report.html was not written: {type(exc).__name__}: {exc}")


def _check_first_scope(recipe: Recipe, configs: list, model: nn.Module) -> None:
    """A scope entry of stage 1 that names no layer fails before the baseline is measured, not
    after. (Later stages see the model their predecessors made; they check when they start.)"""
    scope = getattr(configs[0], "scope", None) if configs else None
    if isinstance(scope, Scope):
        try:
            scope.resolve(model, ("Module",))  # every layer type: only the names are checked here
        except ScopeError as err:
            raise ScopeError(f"stage 1 ({recipe.stages[0].name}): {err}", hint=err.hint) from None


def _check_resume(out: Path, recipe: Recipe, resume: bool) -> None:
    resolved = recipe.to_yaml()
    path = out / "recipe.yaml"
    if path.exists():
        if not resume:
            raise ConfigError(f"run folder {out} already holds a run",
                              hint="choose a new --out, or pass --resume to continue it")
        if path.read_text(encoding="utf-8") != resolved:
            raise ConfigError(f"run folder {out} holds a run of a different recipe; it cannot be resumed",
                              hint="choose a new --out, or delete the folder to start over")
    else:
        write_text(path, resolved)


def run_recipe(recipe: Recipe, model: nn.Module, data: DatasetBundle, out: str | Path | None = None,
               resume: bool = True) -> RunResult:
    """Run every stage of ``recipe`` on ``model`` (modified; pass a copy) with ``data``.

    Each stage runs through :func:`~modelpress.engine.run_method` with the recipe's seed and
    the stage's index (the verbs with ``seed=`` reproduce a one-stage recipe)."""
    configs = recipe.method_configs()
    out = Path(out) if out else None
    check_finite_params(model, "the model to compress")
    name = getattr(data, "name", None)
    check_model_accepts(model, example_inputs(data, 1), f"dataset {name!r}" if name else "the data")
    for split in ("train", "test"):
        check_finite_data(getattr(data, split), f"dataset {name!r} {split} split" if name else f"the {split} data")
    _check_first_scope(recipe, configs, model)
    if recipe.eval.latency and recipe.eval.batch_sizes:  # fail now, not after the first stage
        check_memory([model], resize_batch(example_inputs(data, 1), max(recipe.eval.batch_sizes)),
                     onnx=recipe.eval.onnx, what="the latency benchmark (eval.batch_sizes)")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        _check_resume(out, recipe, resume)
        for p in remove_stale_temps(out):  # left by a run killed while writing
            log(f"[dim]removed {p.relative_to(out)} (a partial file of an interrupted run)[/dim]")
        kill_point("recipe-written")
    try:
        return _run_stages(recipe, configs, model, data, out)
    except KeyboardInterrupt:
        if out:  # a second signal can land inside atomic_path's own cleanup: sweep once more
            remove_stale_temps(out)
            log(f"[yellow]interrupted[/yellow]: finished stages are saved in {out}; "
                "the same command resumes after the last one")
        raise


def _run_stages(recipe: Recipe, configs: list, model: nn.Module, data: DatasetBundle, out: Path | None) -> RunResult:
    rows: list[dict] = []
    infos: list[dict] = []

    base_path = out / "baseline.safetensors" if out else None
    base_metrics = out / "baseline.json" if out else None
    if out and base_metrics.exists():
        model, _ = load_artifact(base_path, base_model=model)
        rows.append(read_json(base_metrics, "run report"))
        log(f"[dim]resuming: baseline loaded from {base_path}[/dim]")
    else:
        if out:
            save_artifact(model, base_path, meta={"stage": "baseline"})
            kill_point("baseline-saved")
        log("measuring the baseline ...")
        rows.append(measure(model, "baseline", data, base_path, recipe, reference=model))
        if out:
            write_json(base_metrics, rows[0])
            kill_point("baseline-done")
    # the uncompressed model: the teacher of distilling stages, the reference of fidelity metrics
    baseline = load_artifact(base_path, base_model=model)[0] if out else copy.deepcopy(model)

    for i, (stage, cfg) in enumerate(zip(recipe.stages, configs)):
        stage_dir = out / "stages" / f"{i + 1:02d}-{stage.name}" if out else None
        if stage_dir and (stage_dir / "metrics.json").exists():
            model, _ = load_artifact(stage_dir / "model.safetensors", base_model=model)
            done = read_json(stage_dir / "metrics.json", "stage report")
            rows.append(done["row"])
            infos.append(done["info"])
            log(f"[dim]stage {i + 1}/{len(recipe.stages)} {stage.name}: already done, loaded[/dim]")
            continue
        log(f"[bold]stage {i + 1}/{len(recipe.stages)}[/bold] {stage.name} ({stage.method})")
        inputs = MethodInputs(data=data.train, train=stage.finetune, task=data.task,
                              loss_fn=_stage_loss(stage, baseline, data.task), log=log, load_model=load_model)
        try:
            model, report = run_method(model, cfg, inputs, seed=recipe.seed, stage=i, inplace=True)
        except ModelpressError as err:
            raise type(err)(f"stage {i + 1} ({stage.name}): {err}", hint=err.hint) from None
        stage_info = {"stage": stage.name, **report.to_dict()}
        if stage_dir:
            path = save_artifact(model, stage_dir / "model.safetensors",
                                 meta={"stage": stage.name, "method": stage.method})
            kill_point(f"stage-{i + 1}-saved")
            # Continue from what was saved, exactly as a resumed run would.
            model, _ = load_artifact(path, base_model=model)
        else:
            path = None
        row = measure(model, stage.name, data, path, recipe, reference=baseline, baseline=baseline)
        rows.append(row)
        infos.append(stage_info)
        if stage_dir:
            write_json(stage_dir / "metrics.json", {"row": row, "info": stage_info})
            kill_point(f"stage-{i + 1}-done")
            _write_reports(out, recipe, rows, infos)
        log(f"  {stage.name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()
                                              if k in (*data.task.metrics, "artifact_bytes")))
    if out:
        # the metrics live in report.json: in the header they would cost ~170 B, 4% of a 4.7 KB model
        save_artifact(model, out / "model.safetensors", meta={"recipe": recipe.name})
        kill_point("final-saved")
    deployed = None
    if recipe.export is not None and out:
        deployed, row = deploy(recipe, model, data, out, baseline)
        rows.append(row)
    elif recipe.export is not None:  # without a run folder the file is measured, not kept
        with tempfile.TemporaryDirectory(prefix="modelpress-deploy-") as tmp:
            rows.append(deploy(recipe, model, data, Path(tmp), baseline)[1])
    if out:
        _write_reports(out, recipe, rows, infos)
    return RunResult(model=model, rows=rows, out=out, infos=infos, deployed=deployed)


def deploy(recipe: Recipe, model: nn.Module, data: DatasetBundle, folder: Path, baseline: nn.Module
           ) -> tuple[Deployed, dict]:
    """Write the file of the recipe's ``export:`` section in ``folder`` (``model`` + the runtime's suffix)
    and measure it: ``(Deployed, report row)``. The row's quality is what the runtime computes on the
    test split; its latency is against the baseline's float file in the same runtime."""
    spec, ev = recipe.export, recipe.eval
    runtime = get_runtime(spec.runtime)
    runtime.require()
    path = folder / f"model{runtime.suffixes[0]}"
    log(f"exporting for {runtime.label} ...")
    path, note = export_deployable(model.eval(), data.example_inputs(1), path, embedding_bits=spec.embedding_bits,
                                   accuracy_level=spec.accuracy_level, fmt=_FORMATS[runtime.name],
                                   tflite=spec.tflite, calibration=data.train)
    deployed = Deployed(path, runtime.name)
    row: dict[str, Any] = {"label": f"deployed: {path.name} ({runtime.label})"}
    row.update(data.evaluate(deployed.open(threads=ev.threads).as_module(), reference=baseline))
    row["artifact_bytes"] = sum(p.stat().st_size for p in (path, path.with_suffix(".bin")) if p.exists())
    if ev.latency:
        row.update(compare_deployed(baseline.eval(), deployed, data.example_inputs(1),
                                    batch_sizes=tuple(ev.batch_sizes), threads=ev.threads, repeats=ev.repeats))
    log(f"  {path.name}: {note}")
    return deployed, row


_FORMATS = {"onnxruntime": "onnx", "openvino": "openvino", "litert": "tflite"}


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)
