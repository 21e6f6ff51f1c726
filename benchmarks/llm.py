"""Transformer-era compression on real weights (issue 16): GPTQ vs round-to-nearest, SparseGPT / Wanda
vs magnitude, and int4 that deploys (ONNX Runtime MatMulNBits), side by side with ONNX Runtime's own
int4 quantizer.

Testbed (this run): the bundled all-MiniLM-L6-v2 (real pretrained weights). Quality: Spearman of
cosine vs grade on the bundled graded pairs and fidelity (mean cosine to the fp32 embeddings).
Calibration: 256 sentences of the ``everyday`` corpus (never the graded pairs), batches of 16.
Every row goes through ``modelpress.engine.run_method`` (what ``modelpress quantize gptq`` /
``modelpress prune wanda`` run), so each row is one product command, e.g.
``modelpress quantize gptq -m minilm -d sts --set bits=4 --set group_size=128``.

Columns: Spearman, fidelity, artifact bytes, calibration seconds; for the weight-only rows also the
deployed file (``export_deployable``: MatMulNBits, ``accuracy_level`` 4: int8 activations; the int4
rows again at level 0: fp32 compute, exact), its fidelity as run by
ONNX Runtime, its bytes and its latency on one sentence (batch 1, the decode-like case) against the
fp32 ONNX Runtime file, timed alternately in one process (``compare_latency``), 1 and 2 threads.
The peer row: ONNX Runtime's ``MatMulNBitsQuantizer`` (RTN, symmetric, block 128, accuracy level 4)
on the same fp32 file.

    python benchmarks/llm.py            # ~10 min on 2 cores
    python benchmarks/llm.py --quick    # fewer rows and timings
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from modelpress.analysis.latency import compare_latency  # noqa: E402
from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.engine import MethodInputs, run_method  # noqa: E402
from modelpress.export.deploy import export_deployable  # noqa: E402
from modelpress.export.onnx import export_onnx, ort_feeds, ort_session  # noqa: E402
from modelpress.pruning.magnitude import MagnitudePruning  # noqa: E402
from modelpress.pruning.nm import NMSparsity  # noqa: E402
from modelpress.pruning.sparsegpt import SparseGPT  # noqa: E402
from modelpress.pruning.wanda import Wanda  # noqa: E402
from modelpress.quantization.awq import AWQ  # noqa: E402
from modelpress.quantization.gptq import GPTQ  # noqa: E402
from modelpress.quantization.smoothquant import SmoothQuant  # noqa: E402
from modelpress.quantization.static import StaticInt8  # noqa: E402
from modelpress.quantization.weight_only import WeightOnly  # noqa: E402

ROWS = [
    ("RTN w4 g128", WeightOnly(bits=4, granularity="group", group_size=128)),
    ("GPTQ w4 g128", GPTQ(bits=4, group_size=128)),
    ("RTN w4 g128, MSE ranges", WeightOnly(bits=4, granularity="group", group_size=128, range_search="mse")),
    ("GPTQ w4 g128, MSE ranges", GPTQ(bits=4, group_size=128, range_search="mse")),
    ("RTN w3 g128", WeightOnly(bits=3, granularity="group", group_size=128)),
    ("GPTQ w3 g128", GPTQ(bits=3, group_size=128)),
    ("AWQ w4 g128", AWQ(bits=4, group_size=128)),
    ("AWQ w3 g128", AWQ(bits=3, group_size=128)),
    ("static W8A8, minmax", StaticInt8(observer="minmax")),
    ("SmoothQuant W8A8, minmax", SmoothQuant(observer="minmax")),
    ("static W8A8, percentile", StaticInt8()),
    ("SmoothQuant W8A8, percentile", SmoothQuant()),
    ("SmoothQuant W8A8 alpha 0.5, percentile", SmoothQuant(alpha=0.5)),
    ("magnitude 50%", MagnitudePruning(sparsity=0.5, ranking="layer")),
    ("Wanda 50%", Wanda()),
    ("SparseGPT 50%", SparseGPT()),
    ("magnitude 2:4", NMSparsity()),
    ("Wanda 2:4", Wanda(pattern="2:4")),
    ("SparseGPT 2:4", SparseGPT(pattern="2:4")),
]
QUICK = {"RTN w4 g128", "GPTQ w4 g128", "AWQ w4 g128", "static W8A8, minmax", "SmoothQuant W8A8, minmax",
         "magnitude 50%", "SparseGPT 50%"}


class OrtEncoder(nn.Module):
    """An ONNX file behind the encoder's call signature, so ``embedding_quality`` can score it."""

    def __init__(self, path: Path):
        super().__init__()
        self.session = ort_session(path, threads=None, spinning=False)

    def forward(self, **inputs):
        return torch.from_numpy(self.session.run(None, ort_feeds(self.session, inputs))[0])


def ort_int4(fp32: Path, dest: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, RTNWeightOnlyQuantConfig

    q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=128, is_symmetric=True, accuracy_level=4,
                             algo_config=RTNWeightOnlyQuantConfig())
    q.process()
    q.model.save_model_to_file(str(dest), use_external_data_format=False)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from modelpress.tasks.embedding import embed_sentences, embedding_quality, pair_sentences, tokenize
    from modelpress.zoo.corpora import load_sentences, load_sts_pairs
    from modelpress.zoo.models import build_model

    torch.manual_seed(0)
    dense = build_model("minilm").eval()
    tok = dense.tokenizer
    pairs = load_sts_pairs()
    ref = embed_sentences(dense, tok, pair_sentences(pairs))
    calib = load_sentences(256, corpus="everyday")
    batches = [tokenize(tok, calib[i:i + 16]) for i in range(0, len(calib), 16)]
    one = tokenize(tok, pair_sentences(pairs)[:1])  # batch 1: one sentence
    repeats = 10 if args.quick else 40
    tmp = Path(tempfile.mkdtemp(prefix="mp-llm-"))
    fp32_onnx = export_onnx(dense, one, tmp / "fp32.onnx")

    def quality(model) -> tuple[float, float]:
        q = embedding_quality(model, pairs, reference=ref, tokenizer=tok)
        return q["spearman"], q["fidelity"]

    def deploy(path: Path) -> dict:
        sp, fid = quality(OrtEncoder(path))
        out = {"ort_spearman": sp, "ort_fidelity": fid, "onnx_bytes": path.stat().st_size}
        for threads in (1, 2):
            c = compare_latency(fp32_onnx, path, one, threads=threads, warmup=3, repeats=repeats)
            out[f"x{threads}"] = (c.a.median_ms, c.b.median_ms, c.ratio)
        return out

    table = []
    sp, fid = quality(dense)
    table.append({"row": "fp32", "spearman": sp, "fidelity": fid,
                  "bytes": save_artifact(dense, tmp / "fp32.safetensors").stat().st_size, "seconds": 0.0,
                  "onnx_bytes": fp32_onnx.stat().st_size})
    for name, cfg in ROWS:
        if args.quick and name not in QUICK:
            continue
        t0 = time.perf_counter()
        model, _ = run_method(dense, cfg, MethodInputs(data=batches))
        seconds = time.perf_counter() - t0
        sp, fid = quality(model.eval())
        row = {"row": name, "spearman": sp, "fidelity": fid, "seconds": seconds,
               "bytes": save_artifact(model, tmp / f"{len(table)}.safetensors").stat().st_size}
        table.append(row)
        if isinstance(cfg, StaticInt8):  # int8 QDQ for ONNX Runtime's int8 kernels
            path, _ = export_deployable(model, one, tmp / f"{len(table)}.onnx")
            row.update(deploy(path))
        elif isinstance(cfg, (WeightOnly, GPTQ, AWQ)):
            for level in (4, 0) if cfg.bits == 4 else (4,):
                path, _ = export_deployable(model, one, tmp / f"{len(table)}-{level}.onnx", accuracy_level=level)
                if level == 4:
                    row.update(deploy(path))
                else:  # ONNX Runtime's exact fp32 compute: its own row, deployment columns only
                    table.append({"row": f"{name}, accuracy_level 0", **deploy(path)})
        print(f"{name}: spearman {sp:.4f} fidelity {fid:.4f} ({seconds:.1f} s)", flush=True)
    try:
        t0 = time.perf_counter()
        path = ort_int4(fp32_onnx, tmp / "ort_int4.onnx")
        row = {"row": "peer: ORT MatMulNBitsQuantizer RTN w4 b128", "seconds": time.perf_counter() - t0}
        row.update(deploy(path))
        table.append(row)
    except Exception as exc:  # a peer that fails is a row that says so
        table.append({"row": f"peer: ORT MatMulNBitsQuantizer failed: {type(exc).__name__}: {exc}"[:200]})
    print_table(table)


def print_table(table: list[dict]) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def lat(r, threads):
        v = r.get(f"x{threads}")
        return "-" if v is None else f"{v[1]:.2f} ms vs {v[0]:.2f} ({v[2]:.2f}x)"

    print("\n| row | Spearman | fidelity | artifact bytes | calibration s | ONNX Runtime Spearman / fidelity | "
          ".onnx bytes | batch 1, 1 thread vs fp32 ORT | batch 1, 2 threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        ort = (f"{r['ort_spearman']:.4f} / {r['ort_fidelity']:.4f}" if "ort_spearman" in r else "-")
        print(f"| {r['row']} | {f(r.get('spearman'), '.4f')} | {f(r.get('fidelity'), '.4f')} | "
              f"{f(r.get('bytes'), ',')} | {f(r.get('seconds'), '.1f')} | {ort} | {f(r.get('onnx_bytes'), ',')} | "
              f"{lat(r, 1)} | {lat(r, 2)} |")
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
