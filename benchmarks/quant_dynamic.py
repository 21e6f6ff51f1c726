"""Dynamic int8 quantization of MiniLM: modelpress vs torch.ao and ONNX Runtime (issue 4).

Rows (all on the bundled all-MiniLM-L6-v2, no training, no calibration data):

* fp32 eager PyTorch (the reference of every ratio);
* modelpress ``quant.dynamic_int8`` default (per-channel weights in 7 bits, one 8-bit dynamic
  activation scale per tensor, fbgemm int8 GEMM), and with ``activations="row"`` (per-row scales);
* ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`` (defaults:
  per-tensor weights, reduce_range on x86);
* fp32 ONNX Runtime (``modelpress.export.onnx.export_onnx``, ORT_ENABLE_ALL);
* ONNX Runtime ``onnxruntime.quantization.quantize_dynamic`` on that ONNX file. Weight type
  QInt8 / QUInt8, ``per_channel`` on / off and, for QInt8, ``reduce_range`` on / off are all
  tried; the row shows the fastest setting (1 thread, short batch) among those meeting the
  issue's quality target, or the most faithful when none does; every variant is listed below
  the main table.

Quality: Spearman of cosine vs grade on the bundled graded STS pairs, and fidelity = mean cosine
to the fp32 embeddings (target: Spearman within 0.01 of fp32, fidelity >= 0.98). Size: bytes on
disk: modelpress artifact (safetensors) for the eager fp32 / modelpress rows,
``torch.save(state_dict)`` for torch.ao, the ``.onnx`` file for ONNX Runtime. Latency: median ms
per call on batch 32, measured with ``compare_latency`` against fp32 eager in the same process
(the two alternate call by call), at 1 and 2 threads (torch threads / ORT intra-op threads, ORT
thread spinning off so the two runtimes do not steal each other's cores);
"x" is fp32-eager median / row median. Two batches: the first 32 sentences of
``pair_sentences(load_sts_pairs())`` padded to the longest (short), and the same padded to 128
tokens (long; int8 gains grow with sequence length).

    python benchmarks/quant_dynamic.py             # full run (~4-5 min on 2 cores)
    python benchmarks/quant_dynamic.py --quick     # smoke run: few timings
    python benchmarks/quant_dynamic.py --kernels   # int8 GEMM kernels vs fp32 on MiniLM Linear shapes
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from modelpress import quantize  # noqa: E402
from modelpress.analysis.latency import compare_latency  # noqa: E402
from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.export.onnx import export_onnx, ort_feeds, ort_session  # noqa: E402
from modelpress.quantization.dynamic import DynamicInt8  # noqa: E402
from modelpress.quantization.primitives import sqnr  # noqa: E402

SPEARMAN_TOL, FIDELITY_MIN = 0.01, 0.98


class OrtEncoder(nn.Module):
    """An ONNX file behind the SentenceEncoder call signature, so ``embedding_quality`` can score it
    and ``compare_latency`` can time it against eager PyTorch.

    The session is ``ort_session(spinning=False)``: idle ORT threads otherwise spin after each call
    and take the cores from the PyTorch call that ``compare_latency`` runs next (on 2 cores that
    doubled both timings).
    """

    def __init__(self, path, tokenizer, threads: int | None = None):
        super().__init__()
        self.session = ort_session(path, threads=threads, spinning=False)
        self.tokenizer = tokenizer

    def forward(self, **inputs):
        return torch.from_numpy(self.session.run(None, ort_feeds(self.session, inputs))[0])


def artifact_bytes(model, d: Path, name: str) -> int:
    return save_artifact(model, d / f"{name}.safetensors").stat().st_size


def state_dict_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def ort_quantized(src: Path, dest: Path, weight_type: str, per_channel: bool, reduce_range: bool) -> Path:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a pre-processing suggestion per call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), str(dest), weight_type=getattr(QuantType, weight_type), per_channel=per_channel,
                         reduce_range=reduce_range)
    root.setLevel(level)
    return dest


def meets_target(q: dict, q0: dict) -> bool:
    return q["spearman"] >= q0["spearman"] - SPEARMAN_TOL and q["fidelity"] >= FIDELITY_MIN


def rows(quick: bool) -> list[dict]:
    """One dict per row: name, spearman, fidelity, bytes, size_kind, lat[(batch, threads)] = (fp32, row, x)."""
    from modelpress.tasks.embedding import embed_sentences, embedding_quality, pair_sentences, tokenize
    from modelpress.zoo.corpora import load_sts_pairs
    from modelpress.zoo.models import build_model

    dense = build_model("minilm").eval()
    tok = dense.tokenizer
    pairs = load_sts_pairs()
    sentences = pair_sentences(pairs)[:32]
    batches = {"short": tokenize(tok, sentences),
               "long": tokenize(tok, sentences, max_length=128, padding="max_length")}
    q0 = embedding_quality(dense, pairs)
    ref_emb = embed_sentences(dense, tok, pair_sentences(pairs))  # fidelity reference: fp32 eager embeddings
    # (warmup, repeats, min seconds): a long-batch call takes 1-3 s on one core
    timing = {"short": (2, 5, 0.0) if quick else (3, 15, 1.5), "long": (1, 1, 0.0) if quick else (1, 3, 0.0)}

    def lat(candidate, which=("short", "long")):
        out = {}
        for bname in which:
            x = batches[bname]
            warmup, repeats, min_t = timing[bname]
            for threads in (1, 2):
                timed = OrtEncoder(candidate, tok, threads) if isinstance(candidate, Path) else candidate
                c = compare_latency(dense, timed, x, threads=threads, warmup=warmup, repeats=repeats,
                                    min_time_s=min_t)
                out[(bname, threads)] = (c.a.median_ms, c.b.median_ms, c.ratio)
        return out

    def row(name, model, size, kind, note="", which=("short", "long")):
        q = embedding_quality(model, pairs, reference=ref_emb, tokenizer=tok)
        return {"row": name, "spearman": q["spearman"], "fidelity": q["fidelity"], "bytes": size,
                "size_kind": kind, "target": meets_target(q, q0), "lat": lat(model, which) if which else None,
                "note": note}

    out = []
    d = Path(tempfile.mkdtemp(prefix="quant_dynamic_"))
    out.append({"row": "fp32 eager (PyTorch)", "spearman": q0["spearman"], "fidelity": 1.0,
                "bytes": artifact_bytes(dense, d, "fp32"), "size_kind": "artifact", "target": True, "lat": None,
                "note": f"short batch 32 x {batches['short']['input_ids'].shape[1]} tokens, long 32 x 128"})

    for act in ("tensor", "row"):
        t = time.perf_counter()
        qm = quantize(dense, DynamicInt8(activations=act)).eval()
        took = time.perf_counter() - t
        name = "default" if act == "tensor" else "activations=row"
        out.append(row(f"modelpress quant.dynamic_int8 ({name}) eager", qm, artifact_bytes(qm, d, f"mp_{act}"),
                       "artifact", f"quantize {took:.1f}s", which=() if quick and act == "row" else
                       ("short", "long")))

    ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(dense), {nn.Linear}, dtype=torch.qint8).eval()
    out.append(row("torch.ao quantize_dynamic (qint8 Linear) eager", ao, state_dict_bytes(ao), "torch.save state_dict",
                   "per-tensor weights, reduce_range (x86 default)"))

    fp32_onnx = export_onnx(dense, batches["short"], d / "minilm.onnx")
    out.append(row("fp32 ONNX Runtime", OrtEncoder(fp32_onnx, tok), fp32_onnx.stat().st_size, ".onnx",
                   "export_onnx (TorchScript, opset 17)") | {"lat": lat(fp32_onnx)})

    variants = []
    for wt, pc, rr in [("QInt8", False, False), ("QInt8", True, False), ("QInt8", False, True), ("QInt8", True, True),
                       ("QUInt8", False, False), ("QUInt8", True, False)]:
        path = ort_quantized(fp32_onnx, d / f"q_{wt}_{pc}_{rr}.onnx", wt, pc, rr)
        q = embedding_quality(OrtEncoder(path, tok), pairs, reference=ref_emb, tokenizer=tok)
        c = compare_latency(dense, OrtEncoder(path, tok, 1), batches["short"], threads=1, warmup=2,
                            repeats=3 if quick else 6)
        variants.append({"setting": f"weight_type={wt}, per_channel={pc}, reduce_range={rr}", "path": path,
                         "spearman": q["spearman"], "fidelity": q["fidelity"], "ms": c.b.median_ms, "x": c.ratio,
                         "bytes": path.stat().st_size, "target": meets_target(q, q0)})
    ok = [v for v in variants if v["target"]]
    best = min(ok, key=lambda v: v["ms"]) if ok else max(variants, key=lambda v: v["fidelity"])
    why = "fastest meeting the target" if ok else "none meets the target: most faithful"
    out.append({"row": "ONNX Runtime quantize_dynamic", "spearman": best["spearman"], "fidelity": best["fidelity"],
                "bytes": best["bytes"], "size_kind": ".onnx", "target": best["target"], "lat": lat(best["path"]),
                "note": f"{best['setting']} ({why})", "variants": variants})
    return out


def fmt_lat(r, batch, threads):
    if not r.get("lat") or (batch, threads) not in r["lat"]:
        return "-"
    a, b, x = r["lat"][(batch, threads)]
    return f"{b:.1f} ms ({x:.2f}x)"


def print_table(table: list[dict]) -> None:
    header = ["", "spearman", "fidelity vs fp32", "target", "size (bytes)", "size of",
              "short 1 thr", "short 2 thr", "long(128) 1 thr", "long(128) 2 thr", "notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in table:
        lat0 = next((x["lat"] for x in table if x.get("lat")), None)
        if r["row"].startswith("fp32 eager") and lat0:  # the reference's own medians, from the first comparison
            cells = [f"{lat0[(b, t)][0]:.1f} ms (1.00x)" for b in ("short", "long") for t in (1, 2)]
        else:
            cells = [fmt_lat(r, b, t) for b in ("short", "long") for t in (1, 2)]
        print("| " + " | ".join([r["row"], f"{r['spearman']:.4f}", f"{r['fidelity']:.4f}",
                                 "yes" if r["target"] else "no", f"{r['bytes']:,}", r["size_kind"], *cells,
                                 r.get("note", "")]) + " |")
    variants = next((r["variants"] for r in table if "variants" in r), [])
    if variants:
        print("\nONNX Runtime quantize_dynamic settings (latency: short batch, 1 thread, vs fp32 eager):\n")
        print("| setting | spearman | fidelity | target | size (bytes) | latency |")
        print("|---|---|---|---|---|---|")
        for v in variants:
            print(f"| {v['setting']} | {v['spearman']:.4f} | {v['fidelity']:.4f} | {'yes' if v['target'] else 'no'} "
                  f"| {v['bytes']:,} | {v['ms']:.1f} ms ({v['x']:.2f}x) |")


# -- int8 GEMM kernels on MiniLM's Linear shapes (the choice in modelpress.quantization.dynamic) ----
def _qweight(w):
    s = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s


def _fbgemm_pack(q, s, bias, engine):
    prev = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(s.numel(), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, bias)
    finally:
        torch.backends.quantized.engine = prev


def kernel_candidates(lin: nn.Linear) -> dict:
    w, b = lin.weight.detach(), lin.bias.detach()
    q, s = _qweight(w)
    fb8 = _fbgemm_pack(q, s, b, "fbgemm")
    q7, s7 = torch.round(w / (s * 127 / 63)[:, None]).clamp(-63, 63).to(torch.int8), s * 127 / 63
    fb_w7 = _fbgemm_pack(q7, s7, b, "fbgemm")
    onednn = _fbgemm_pack(q, s, b, "onednn")
    pw, wz = torch.ops.onednn.qlinear_prepack(q, None), torch.zeros(s.numel(), dtype=torch.long)
    wt = q.t().contiguous()

    def onednn_pointwise(x):
        qx = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
        return torch.ops.onednn.qlinear_pointwise.tensor(
            qx.int_repr(), torch.tensor(qx.q_scale()), torch.tensor(qx.q_zero_point()), pw, s.float(), wz, b,
            1.0, 0, torch.float32, "none", [], "")

    def int_mm(x):
        x2 = x.reshape(-1, x.shape[-1])
        xs = x2.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
        acc = torch._int_mm(torch.round(x2 / xs).to(torch.int8), wt)
        return torch.addcmul(b, acc.float(), xs * s).reshape(*x.shape[:-1], -1)

    def weight_int8pack(x):
        return (torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, s.float()) + b).reshape(
            *x.shape[:-1], -1)

    from modelpress.quantization.dynamic import DynamicInt8Linear
    return {
        "fbgemm linear_dynamic, reduce_range=True": lambda x: torch.ops.quantized.linear_dynamic(x, fb8, True),
        "fbgemm linear_dynamic, reduce_range=False": lambda x: torch.ops.quantized.linear_dynamic(x, fb8, False),
        "fbgemm linear_dynamic, 7-bit weights, 8-bit acts": lambda x: torch.ops.quantized.linear_dynamic(x, fb_w7,
                                                                                                         False),
        "modelpress DynamicInt8Linear (default)": DynamicInt8Linear.from_linear(lin),
        "modelpress DynamicInt8Linear (activations=row)": DynamicInt8Linear.from_linear(lin, activations="row"),
        "onednn linear_dynamic": lambda x: torch.ops.quantized.linear_dynamic(x, onednn, False),
        "onednn qlinear_pointwise": onednn_pointwise,
        "torch._int_mm, per-row": int_mm,
        "aten._weight_int8pack_mm (weight-only)": weight_int8pack,
    }


def kernel_table(quick: bool) -> None:
    torch.manual_seed(0)
    print("| tokens | shape | kernel | fp32 ms | int8 ms | x | output SQNR dB |")
    print("|---|---|---|---|---|---|---|")
    for length in (14, 128):
        for k, n in ((384, 384), (384, 1536), (1536, 384)):
            lin = nn.Linear(k, n)
            x = torch.randn(32, length, k)
            fp32 = lambda v, lin=lin: F.linear(v, lin.weight.detach(), lin.bias.detach())  # noqa: E731
            with torch.no_grad():
                ref = fp32(x)
            for name, fn in kernel_candidates(lin).items():
                with torch.no_grad():
                    err = sqnr(ref, fn(x))
                slow = "int_mm" in name or "int8pack" in name  # reference loops: time them briefly
                c = compare_latency(fp32, fn, x, threads=1, warmup=1 if slow else 3,
                                    repeats=2 if slow or quick else 10, min_time_s=0.0 if slow or quick else 0.5)
                print(f"| {length} | {k}->{n} | {name} | {c.a.median_ms:.2f} | {c.b.median_ms:.2f} | "
                      f"{c.ratio:.2f} | {err:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few timings")
    parser.add_argument("--kernels", action="store_true", help="compare int8 GEMM kernels on MiniLM Linear shapes")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.kernels:
        kernel_table(args.quick)
    else:
        print_table(rows(args.quick))
    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
