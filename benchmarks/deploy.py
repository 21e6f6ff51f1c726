"""Deployment speed by runtime (issue 18): one model, its fp32 and int8 files, every runtime, timed in turns.

For each model: the fp32 ONNX file (``export_onnx``) and modelpress's static int8 (``quant.static_int8``
calibrated on ``--calib`` inputs, exported as QDQ by ``export_deployable``), each run by ONNX
Runtime and by OpenVINO (which reads the same files: ``Deployed(path, "openvino")``), plus eager
PyTorch, and the peer: NNCF's post-training quantization of the OpenVINO model (default settings,
the same calibration inputs; the [peers] extra), run by OpenVINO, and the fp32 model compiled by
``torch.compile`` (the ``torch-compile`` runtime: a ``.pt2`` program, Inductor); all timed in turns, call by
call, in this process (``measure_together``) at each batch size and thread count. Quality: SQNR
(dB) of each file's logits against the PyTorch fp32 model on 8 inputs it was not calibrated on
(torchvision models have random weights here: no ImageNet weights offline); the zoo CNNs
(``--zoo``) are trained baselines and also get their test accuracy.

    python benchmarks/deploy.py                                   # resnet18, mobilenet_v2 at 224 px
    python benchmarks/deploy.py --models resnet18 --batch-sizes 1 --threads 1 --quick
    python benchmarks/deploy.py --zoo lenet5,resnet_small         # trained zoo CNNs on mnist5k
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MODELPRESS_PROGRESS", "0")

import torch  # noqa: E402

from modelpress.analysis.latency import measure_together  # noqa: E402
from modelpress.artifact.loading import load_model  # noqa: E402
from modelpress.core.data import call_model, output_tensor  # noqa: E402
from modelpress.engine import MethodInputs, run_method  # noqa: E402
from modelpress.export.deploy import export_deployable  # noqa: E402
from modelpress.export.onnx import export_onnx  # noqa: E402
from modelpress.quantization.primitives import sqnr  # noqa: E402
from modelpress.quantization.static import StaticInt8  # noqa: E402
from modelpress.runtime import Deployed, available_runtimes  # noqa: E402

RUNTIMES = [r for r in ("onnxruntime", "openvino") if r in available_runtimes()]
COMPILE = "torch-compile" in available_runtimes()  # the fp32 model compiled by TorchInductor (.pt2)
BF16 = "openvino-bf16" in available_runtimes()  # the fp32 file computed in bf16 (CPUs with native bf16)


def files_for(model: torch.nn.Module, calib: list, example: torch.Tensor, folder: Path) -> dict[str, Path]:
    fp32 = export_onnx(model, example, folder / "fp32.onnx")
    q = run_method(model, StaticInt8(), MethodInputs(data=calib))[0].eval()
    int8, _ = export_deployable(q, example, folder / "int8.onnx")
    return {"fp32": fp32, "int8": int8}


def nncf_ir(fp32_onnx: Path, calib: list, folder: Path) -> Path | None:
    """The peer: NNCF's post-training quantization on the OpenVINO model (its recommended path for
    OpenVINO deployment, default settings), saved as IR; None when NNCF is not installed."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None
    ov_model = ov.Core().read_model(str(fp32_onnx))
    name = ov_model.inputs[0].get_any_name()
    items = [{name: x[i:i + 1].numpy()} for x, _ in calib for i in range(len(x))]
    quantized = nncf.quantize(ov_model, nncf.Dataset(items), subset_size=len(items))
    path = folder / "nncf_int8.xml"
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return path


def quality(model, targets: dict[str, Deployed], x: torch.Tensor, y: torch.Tensor | None) -> dict[str, str]:
    with torch.no_grad():
        ref = output_tensor(call_model(model, x))
    out = {}
    for key, deployed in targets.items():
        (got,) = Deployed(deployed.path, deployed.runtime).open(threads=None)(x)
        cell = f"{float(sqnr(ref.float(), got.float())):.1f} dB"
        if y is not None:
            cell += f", {float((got.argmax(1) == y).float().mean()):.2%}"
        out[key] = cell
    return out


def file_bytes(path: Path) -> int:
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


def bench(name: str, model: torch.nn.Module, calib: list, x_eval: torch.Tensor, y_eval, batch_sizes, threads_list,
          quick: bool) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory(prefix="deploy-") as tmp:
        files = files_for(model, calib, calib[0][0][:2], Path(tmp))
        deployed = {f"{rt} {p}": Deployed(f, rt) for p, f in files.items() for rt in RUNTIMES}
        if BF16:
            deployed["openvino-bf16 fp32"] = Deployed(files["fp32"], "openvino-bf16")
        if COMPILE:
            program, _ = export_deployable(model, calib[0][0][:2], Path(tmp) / "fp32.pt2", fmt="pt2")
            deployed["torch-compile fp32"] = Deployed(program, "torch-compile")
        peer = nncf_ir(files["fp32"], calib, Path(tmp)) if "openvino" in RUNTIMES else None
        if peer is not None:
            deployed["NNCF int8"] = Deployed(peer, "openvino")
        q = quality(model, deployed, x_eval, y_eval)
        for bs in batch_sizes:
            x = torch.cat([x_eval] * (bs // len(x_eval) + 1))[:bs]
            for threads in threads_list:
                targets = {"eager": model, **deployed}
                t0 = time.perf_counter()
                stats = measure_together(targets, x, threads=threads, warmup=3 if quick else 10,
                                         repeats=5 if quick else 30, min_time_s=0.0 if quick else 3.0,
                                         max_time_s=60)
                base = stats["onnxruntime fp32"].median_ms
                cells = [f"{stats[k].median_ms:.2f} ms ({base / stats[k].median_ms:.2f}x)" for k in targets]
                lines.append(f"| {name} | {bs} | {threads} | " + " | ".join(cells) + " |")
                print(f"  {name} batch {bs}, {threads} thr: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        lines.append(f"| {name} quality / bytes | | | - | " + " | ".join(
            f"{q[k]}; {file_bytes(d.path):,} B" for k, d in deployed.items()) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2", help="torchvision models at 224 px ('' for none)")
    ap.add_argument("--zoo", default="", help="trained zoo CNNs on mnist5k, e.g. lenet5,resnet_small")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--calib", type=int, default=32, help="calibration inputs")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    threads_list = [int(t) for t in args.threads.split(",")]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    keys = ["eager"] + [f"{rt} {p}" for p in ("fp32", "int8") for rt in RUNTIMES]
    keys += (["openvino-bf16 fp32"] if BF16 else []) + (["torch-compile fp32"] if COMPILE else [])
    if "openvino" in RUNTIMES and importlib.util.find_spec("nncf"):
        keys.append("NNCF int8")
    header = ["model", "batch", "threads"] + [k.replace("onnxruntime", "ORT")
                                               .replace("openvino-bf16 fp32", "OpenVINO bf16")
                                               .replace("openvino", "OpenVINO")
                                               .replace("eager", "PyTorch eager")
                                               .replace("NNCF int8", "NNCF PTQ int8 (OpenVINO)") for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in filter(None, args.models.split(",")):
        model = load_model(f"torchvision:{name}").eval()
        g = torch.Generator().manual_seed(1)
        calib = [(torch.randn(8, 3, 224, 224, generator=g), None) for _ in range(max(1, args.calib // 8))]
        lines += bench(name, model, calib, torch.randn(8, 3, 224, 224, generator=g), None, batch_sizes,
                       threads_list, args.quick)
    if args.zoo:
        from modelpress.zoo.baselines import get_baseline
        from modelpress.zoo.datasets import load_dataset

        bundle = load_dataset("mnist5k")
        x_test, y_test = bundle.test.tensors
        calib = [(x, None) for x, _ in torch.utils.data.DataLoader(bundle.train, batch_size=64)][:8]
        for name in args.zoo.split(","):
            model, _ = get_baseline(name, bundle)
            lines += bench(name, model.eval(), calib, x_test, y_test, batch_sizes, threads_list, args.quick)
    print(f"Latency by runtime, timed in turns in one process (median ms; x = ORT fp32 / row); "
          f"torch {torch.__version__}, {os.cpu_count()} cores\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
