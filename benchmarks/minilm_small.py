"""modelpress's compressed MiniLM for the peer benchmark (issue 6, target 2): the built-in recipe.

``modelpress compress -r sentence-encoder-distill-int8`` (run by ``distill_minilm.recipe_run``, its
run folder cached):

1. ``distill.shallow``: the 3 layers of MiniLM-L6 that hold its output best (0, 4, 5), distilled
   from the 6-layer teacher on unlabelled sentences (1 - cos of the embeddings);
2. ``quant.dynamic_int8``: int8 Linear weights, one scale per output channel;
3. ``export: {runtime: onnxruntime, embedding_bits: 4}``: ``RUN/model.onnx``, ONNX Runtime dynamic
   int8 for the MatMuls and 4-bit blocks (32 values per scale) for the embedding tables.

``peers.py`` measures that file next to the other toolkits'. Run alone it prints the file's size,
quality and batch-32 latency against the fp32 teacher in ONNX Runtime:

    python benchmarks/minilm_small.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_minilm import RECIPE, load_recipe, recipe_run  # noqa: E402

from modelpress.tasks.embedding import pair_sentences, tokenize  # noqa: E402
from modelpress.zoo.corpora import load_sts_pairs  # noqa: E402
from modelpress.zoo.models import build_model  # noqa: E402


def compressed_minilm(quick: bool, workdir: Path, teacher=None) -> dict:
    """The recipe's ONNX file, copied into ``workdir``: ``{"name", "onnx", "notes"}``."""
    run = recipe_run(load_recipe(quick), quick)
    path = Path(workdir) / "minilm-L3-int8-emb4.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.deployed.path, path)
    layers = ",".join(map(str, run.infos[0]["kept"]))
    return {"name": f"modelpress recipe {RECIPE} (layers {layers}, quant.dynamic_int8, 4-bit embeddings), ORT",
            "onnx": path,
            "notes": f"`modelpress compress -r {RECIPE}`; run folder {run.out}"}


def main() -> None:
    from quant_dynamic import OrtEncoder, ort_quantized

    from modelpress.analysis.latency import compare_latency
    from modelpress.export.onnx import export_onnx
    from modelpress.tasks.embedding import embedding_quality

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a 10-step student")
    args = parser.parse_args()
    t0 = time.perf_counter()
    teacher = build_model("minilm").eval()
    pairs = load_sts_pairs()
    batch = tokenize(teacher.tokenizer, pair_sentences(pairs)[:32])
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ours = compressed_minilm(args.quick, d, teacher)
        fp32 = export_onnx(teacher, batch, d / "fp32.onnx")
        files = {"fp32 ONNX Runtime": fp32,
                 "ONNX Runtime quantize_dynamic (QInt8, per channel, reduce_range)":
                     ort_quantized(fp32, d / "ort-int8.onnx", "QInt8", True, True),
                 ours["name"]: ours["onnx"]}
        ref = OrtEncoder(files["ONNX Runtime quantize_dynamic (QInt8, per channel, reduce_range)"], teacher.tokenizer,
                         threads=1)
        print("| model | spearman | fidelity | .onnx bytes | batch 32, 1 thread: ms (x vs ORT int8) |")
        print("|---|---|---|---|---|")
        for name, f in files.items():
            enc = OrtEncoder(f, teacher.tokenizer, threads=1)
            q = embedding_quality(enc, pairs, reference=teacher)
            c = compare_latency(ref, enc, batch, threads=1, warmup=2, repeats=5 if args.quick else 30,
                                min_time_s=0.0 if args.quick else 2.0)
            print(f"| {name} | {q['spearman']:.4f} | {q['fidelity']:.4f} | {f.stat().st_size:,} | "
                  f"{c.b.median_ms:.1f} ({c.ratio:.2f}x) |")
    print(f"\n{ours['notes']}\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
