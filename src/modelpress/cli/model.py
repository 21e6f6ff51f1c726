"""Commands on one model: ``train``, ``evaluate``, ``analyze``, ``export``, ``sensitivity``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Column, Table

from ..core.errors import ModelpressError
from .common import DATA_HELP, MODEL_HELP, load, load_bundle, load_with_data, out

TRUST = typer.Option(False, "--trust-remote-code", help="allow loading files that can run code")


def train(model: str = typer.Argument(..., help="zoo model name or path/file.py:factory"),
          data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
          epochs: float = typer.Option(6, help="passes over the training split"),
          lr: float = typer.Option(2e-3, help="learning rate (Adam, cosine decay)"),
          seed: int = typer.Option(0),
          output: Optional[Path] = typer.Option(None, "--out", "-o",
                                                help="artifact path (default: the baseline cache)")):
    """Train a baseline classifier with a progress bar and save it as an artifact.

    [bold]Examples[/bold]: modelpress train lenet5 --data mnist5k ·
    modelpress train my.py:build --data digits -o base.safetensors
    """
    from ..artifact.checkpoint import save_artifact
    from ..artifact.loading import load_model
    from ..core.training import TrainConfig
    from ..zoo.baselines import get_baseline, train_model
    from ..zoo.models import list_models

    bundle = load_bundle(data, seed)
    cfg = TrainConfig(epochs=epochs, lr=lr)
    if model in list_models() and output is None:
        m, path = get_baseline(model, bundle, seed=seed, train=cfg, retrain=True)
    else:
        m = train_model(load_model(model), bundle, cfg, seed)
        path = save_artifact(m, output or Path(f"{model.split(':')[-1]}-{data.split(':')[0]}.safetensors"),
                             meta={"dataset": bundle.name, "seed": seed, "train": cfg.to_dict()})
    quality = ", ".join(f"{k} {v:.4f}" for k, v in bundle.evaluate(m).items())
    out.print(f"test {quality}; saved to {path}")


def evaluate(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
             data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
             reference: Optional[str] = typer.Option(None, help="reference model for embedding fidelity"),
             trust_remote_code: bool = TRUST):
    """Report the dataset's quality metrics: accuracy (classification), Spearman + fidelity (graded sentence pairs),
    perplexity + token accuracy (language modelling: pylm on pystdlib).

    [bold]Examples[/bold]: modelpress evaluate -m runs/demo/model.safetensors -d mnist5k ·
    modelpress evaluate -m minilm -d sts ·
    modelpress evaluate -m runs/m8/model.safetensors -d sts:my_pairs.tsv --reference minilm
    """
    m, bundle = load_with_data(model, data, trust_remote_code=trust_remote_code)
    ref = load(reference, bundle, trust_remote_code=trust_remote_code) if reference else None
    out.print(json.dumps(bundle.evaluate(m, reference=ref), indent=2))


def analyze(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
            data: str = typer.Option("mnist5k", "--data", "-d", help="dataset giving the example input"),
            batch_sizes: str = typer.Option("1,64", help="comma-separated batch sizes for latency"),
            threads: int = typer.Option(1, help="CPU threads for latency measurement"),
            onnx: bool = typer.Option(True, help="export to ONNX (size, check; needed by onnxruntime and openvino)"),
            runtime: str = typer.Option("onnxruntime", "--runtime",
                                        help="comma-separated runtimes timed besides PyTorch: onnxruntime, "
                                             "openvino, torch-compile, litert (batch 1)"),
            layers: int = typer.Option(10, help="show the N layers with the most MACs (0: none)"),
            json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON here"),
            md_out: Optional[Path] = typer.Option(None, "--markdown", help="write the report as Markdown here"),
            trust_remote_code: bool = TRUST):
    """Parameters, MACs per layer, bytes on disk, peak memory and latency (PyTorch and the runtimes).

    Every runtime runs a float file of the model, timed in turns with PyTorch at each batch size.

    [bold]Examples[/bold]: modelpress analyze -m lenet5 ·
    modelpress analyze -m runs/demo/model.safetensors --json a.json ·
    modelpress analyze -m lenet5 --runtime onnxruntime,openvino,litert --batch-sizes 1
    """
    from ..analysis.analyze import analyze as run_analyze
    from ..analysis.tables import to_markdown, to_rich_table
    from ..artifact.checkpoint import artifact_size_of
    from ..core.io import write_json, write_text
    from ..runtime import get_runtime

    runtimes = tuple(r.strip() for r in runtime.split(",") if r.strip())
    for name in runtimes:  # an unknown name fails before the model loads
        get_runtime(name)
    m, bundle = load_with_data(model, data, trust_remote_code=trust_remote_code)
    p = Path(model)
    size = p.stat().st_size if p.is_file() else artifact_size_of(m)
    bs = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    report = run_analyze(m, bundle.example_inputs(1), batch_sizes=bs, threads=threads, onnx=onnx,
                         artifact_bytes=size, runtimes=runtimes)
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


def export(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
           dest: Path = typer.Option(..., "--out", "-o", help="output file (.onnx, .tflite, .keras, .safetensors) "
                                                               "or folder (compressed-tensors)"),
           data: str = typer.Option("mnist5k", "--data", "-d", help="dataset giving the example input (and the "
                                                                     "int8 LiteRT calibration data)"),
           fmt: str = typer.Option("auto", "--format", help="auto (from the suffix), onnx, tflite (LiteRT), keras, "
                                                             "artifact or compressed-tensors (a Hugging Face folder)"),
           sets: List[str] = typer.Option([], "--set", help="tflite: precision=fp32|fp16|dynamic_int8|int8, "
                                                             "channels_last=true, calibration_batches=N, "
                                                             "check_samples=N, min_sqnr_db=DB, "
                                                             "weight_granularity=channel|tensor, strip_names=true"),
           check: bool = typer.Option(True, help="run the exported file (ONNX Runtime, LiteRT) and compare"),
           embedding_bits: int = typer.Option(8, "--embedding-bits",
                                              help="dynamic int8 models: embedding tables as 8 or 4 bits "
                                                   "(0 keeps them float)"),
           accuracy_level: int = typer.Option(4, "--accuracy-level", min=0, max=4,
                                              help="weight-only int2/4/8 Linear layers (MatMulNBits): 0 computes "
                                                   "in fp32 (exact), 4 with int8 activations (fast)"),
           runtime: Optional[str] = typer.Option(None, "--runtime",
                                                 help="onnxruntime (.onnx), openvino (.xml IR), litert (.tflite), "
                                                      "torch-compile (.pt2, a torch.export program), or "
                                                      "auto: build fp32 and int8 for every installed runtime, check "
                                                      "each on -d's test split, time them here, keep the fastest that "
                                                      "keeps quality"),
           batch_size: int = typer.Option(1, "--batch-size", min=1, help="auto: the batch size timed"),
           threads: int = typer.Option(1, "--threads", min=1, help="auto: the threads timed"),
           max_drop: float = typer.Option(0.5, "--max-drop", min=0.0,
                                          help="auto: the most quality points a deployable may lose"),
           trust_remote_code: bool = TRUST):
    """Export a model for deployment: ONNX (int8 QDQ for statically quantized models, ONNX Runtime
    dynamic int8 for dynamically quantized ones, MatMulNBits for weight-only int2/int4/int8 Linear
    layers), LiteRT .tflite (fp32, fp16, dynamic-range int8 or int8 calibrated on -d's training
    split; batch 1, the model's input layout unless channels_last=true), a .keras file (a model
    converted from Keras, written back with its pruned widths and compressed weights), a modelpress
    artifact, or a Hugging Face folder in the compressed-tensors format (int2-8 weight-only and 2:4
    sparse Hugging Face models; transformers and vLLM load it).

    The artifact is safetensors + metadata (packed low-bit weights, codebooks, sparse tensors)
    and reloads in modelpress to the same outputs. ONNX files run in ONNX Runtime.
    [bold]Examples[/bold]: modelpress export -m runs/q/model.safetensors -o lenet5-int8.onnx ·
    modelpress export -m runs/p/model.safetensors -o small.safetensors ·
    modelpress export -m runs/gptq/model.safetensors -d sts -o minilm-w4 --format compressed-tensors ·
    modelpress export -m runs/p/model.safetensors -d digits -o lenet5.tflite --set precision=int8 ·
    modelpress export -m runs/p/model.safetensors -d mnist5k -o lenet5-small.keras ·
    modelpress export -m runs/p/model.safetensors -d mnist5k -o deploy/lenet5 --runtime auto
    """
    if runtime == "auto":
        return _export_auto(model, dest, data, batch_size, threads, max_drop, trust_remote_code)
    if runtime is not None:
        runtimes = {"onnxruntime": "onnx", "openvino": "openvino", "openvino-bf16": "openvino", "litert": "tflite",
                    "torch-compile": "pt2"}  # openvino-bf16 runs the same IR with bf16 compute
        if runtime not in runtimes:
            raise ModelpressError(f"--runtime {runtime!r} is not known",
                                  hint="use auto, onnxruntime, openvino, openvino-bf16, litert or torch-compile")
        if fmt not in ("auto", runtimes[runtime]):
            raise ModelpressError(f"--runtime {runtime} writes {runtimes[runtime]}, not --format {fmt}",
                                  hint="give one of --runtime and --format")
        fmt = runtimes[runtime]
    suffixes = {".onnx": "onnx", ".tflite": "tflite", ".keras": "keras", ".xml": "openvino", ".pt2": "pt2"}
    kind = fmt if fmt != "auto" else suffixes.get(dest.suffix, "artifact")
    if kind not in ("onnx", "tflite", "keras", "openvino", "pt2", "artifact", "compressed-tensors"):
        raise ModelpressError(f"--format {fmt!r} is not known",
                              hint="use auto, onnx, tflite, keras, openvino, pt2, artifact or compressed-tensors")
    if kind == "pt2" and dest.suffix != ".pt2":
        dest = dest.with_suffix(".pt2")
    if kind == "openvino" and dest.suffix != ".xml":
        dest = dest.with_suffix(".xml")
    if sets and kind != "tflite":
        raise ModelpressError(f"--set applies to --format tflite, not {kind}",
                              hint="ONNX takes --embedding-bits and --accuracy-level")
    tflite = None
    if kind == "tflite":  # checked before any data or model is loaded
        from ..export.tflite import TfliteOptions
        from ..recipes.schema import apply_overrides

        tflite = TfliteOptions.from_dict(apply_overrides({}, sets), where="--set")
    m, bundle = load_with_data(model, data, trust_remote_code=trust_remote_code)
    if kind == "compressed-tensors":
        from ..export.compressed_tensors import export_compressed_tensors

        done = export_compressed_tensors(m, dest, check_inputs=bundle.example_inputs(2) if check else None)
        out.print(f"wrote {done.path}/ (model.safetensors {done.file_bytes:,} bytes); {done.note}")
        return
    if kind == "keras":
        from ..export.keras import export_keras

        done = export_keras(m, dest, example_inputs=bundle.example_inputs(2), check=check)
        out.print(f"wrote {done.path} ({done.bytes:,} bytes); {done.note}", highlight=False, soft_wrap=True)
        return
    if kind == "artifact":
        from ..artifact.checkpoint import save_artifact

        path = save_artifact(m, dest)
        out.print(f"wrote {path} ({path.stat().st_size:,} bytes)")
        return
    from ..export.deploy import export_deployable

    if tflite is not None:  # checked on a few test inputs, int8 calibrated on the training split
        path, note = export_deployable(m, bundle.example_inputs(tflite.check_samples), dest, check=check,
                                       fmt="tflite", tflite=tflite, calibration=bundle.train)
        out.print(f"wrote {path}; {note}", highlight=False, soft_wrap=True)
        return
    path, note = export_deployable(m, bundle.example_inputs(1), dest, check=check,
                                   embedding_bits=embedding_bits or None, accuracy_level=accuracy_level,
                                   fmt=kind if kind in ("openvino", "pt2") else "onnx")
    size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if kind == "openvino" else 0)
    out.print(f"wrote {path}{' + .bin' if kind == 'openvino' else ''} ({size:,} bytes){'; ' + note if note else ''}",
              highlight=False, soft_wrap=True)


def _export_auto(model: str, dest: Path, data: str, batch_size: int, threads: int, max_drop: float,
                 trust_remote_code: bool) -> None:
    """``export --runtime auto``: the fastest deployable that keeps quality, chosen by measuring here."""
    from ..analysis.choose import choose_deployable

    m, bundle = load_with_data(model, data, trust_remote_code=trust_remote_code)
    choice = choose_deployable(m, bundle, dest, batch_size=batch_size, threads=threads, max_drop=max_drop)
    out.print(choice.table(), highlight=False, soft_wrap=True)
    c = choice.chosen
    out.print(f"wrote {choice.path} ({c.bytes:,} bytes): {c.name}, {c.ms:.3f} ms at batch {batch_size} "
              f"({threads} thr), {choice.primary} {c.metrics.get(choice.primary, float('nan')):.4f}; "
              f"run it with the {c.runtime} runtime (e.g. modelpress analyze --runtime {c.runtime})",
              highlight=False, soft_wrap=True)


def sensitivity(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
                data: str = typer.Option("mnist5k", "--data", "-d", help=DATA_HELP),
                out_dir: Path = typer.Option(Path("sensitivity"), "--out", "-o",
                                             help="folder for the JSON, PNG and report.html"),
                sparsities: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="comma-separated"),
                metric: str = typer.Option("accuracy", help="accuracy or loss"),
                target: Optional[float] = typer.Option(None, help="also allocate per-layer sparsity for this "
                                                                   "global target"),
                trust_remote_code: bool = TRUST):
    """Per-layer sensitivity: accuracy (or loss) when pruning one layer at a time, as a table and a plot.

    With --target, turns the curves into per-layer sparsities meeting that global target
    with the least loss (paste them into a recipe's layer_sparsity).
    [bold]Examples[/bold]: modelpress sensitivity -m lenet5 -o sens ·
    modelpress sensitivity -m runs/a/model.safetensors --target 0.9
    """
    from ..analysis.report_html import write_html_report
    from ..core.io import write_json
    from ..pruning.sensitivity import SensitivityConfig, sensitivity_scan

    m, bundle = load_with_data(model, data, trust_remote_code=trust_remote_code)
    cfg = SensitivityConfig.from_dict({"sparsities": [float(v) for v in sparsities.split(",") if v.strip()],
                                       "metric": metric}, where="sensitivity")
    result = sensitivity_scan(m, bundle.test, cfg)
    out.print(result.to_table())
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = result.to_dict()
    if target is not None:
        ratios = result.ratios_for_target(target)
        doc["ratios_for_target"] = {"target": target, "layer_sparsity": ratios}
        table = Table("layer", Column("sparsity", justify="right"),
                      title=f"per-layer sparsity for {target:.0%} overall")
        for name, r in ratios.items():
            table.add_row(name, f"{r:.3f}")
        out.print(table)
    write_json(out_dir / "sensitivity.json", doc)
    png = result.plot(out_dir / "sensitivity.png")
    html = write_html_report(out_dir, f"sensitivity of {model} on {data}", [], [], sensitivity=doc)
    out.print(f"wrote {out_dir / 'sensitivity.json'}, {png} and {html}")


def register(app: typer.Typer) -> None:
    for fn in (train, evaluate, analyze, sensitivity):
        app.command()(fn)
    app.command("export")(export)
