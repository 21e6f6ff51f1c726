"""MiniLM-L6 distilled into 3 of its layers by the product: the built-in recipe ``sentence-encoder-distill-int8``.

The recipe's first stage, ``distill.shallow``, keeps half of the teacher's layers, the ones whose
output stays closest to the teacher's on the training sentences before any training (it picks
layers 0, 4 and 5: fidelity 0.78, against 0.57 for every other layer, 1, 3, 5), then distills the
teacher's embeddings into them (1 - cos, 4 epochs, AdamW, lr 5e-4, batch 32, word embeddings
frozen) on the bundled unlabelled corpus ``sentences?corpus=bundled*2,everyday*3,grammar``: the
template sentences twice, the hand-written everyday ones three times and 20,000 sentences of the
template grammar, minus near-copies of the graded pairs the report scores (34,233 sentences per
epoch). The recipe is run exactly as ``modelpress compress -r sentence-encoder-distill-int8``
does; its run folder is kept in ``$MODELPRESS_CACHE/runs`` (keyed by the resolved recipe), so
reruns and ``minilm_small.py`` / ``peers.py`` read the finished run back.

Reported: Spearman on the bundled graded pairs, fidelity (mean cosine to the teacher), parameters,
artifact bytes and batch-32 eager latency teacher -> student (``compare_latency``, alternating in
one process), for the teacher, the two untrained students (every other layer; the layers
``distill.shallow`` picks) and the distilled one. Target (issue 5): >= 1.8x faster, fidelity >= 0.95.

    python benchmarks/distill_minilm.py           # full run (~30 minutes on 2 cores, cached after)
    python benchmarks/distill_minilm.py --quick   # smoke run: 10 steps on the template corpus
    python benchmarks/distill_minilm.py --set stage.1.finetune.epochs=2   # the recipe, changed
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("MODELPRESS_PROGRESS", "0")

from modelpress import compress  # noqa: E402
from modelpress.analysis.latency import compare_latency  # noqa: E402
from modelpress.artifact.checkpoint import artifact_size_of  # noqa: E402
from modelpress.artifact.loading import load_artifact  # noqa: E402
from modelpress.distillation.shallow import ShallowDistillation  # noqa: E402
from modelpress.engine import MethodInputs, run_method  # noqa: E402
from modelpress.recipes.pipeline import RunResult  # noqa: E402
from modelpress.recipes.schema import Recipe  # noqa: E402
from modelpress.tasks.embedding import embedding_quality, pair_sentences, tokenize  # noqa: E402
from modelpress.zoo.baselines import cache_dir  # noqa: E402
from modelpress.zoo.corpora import load_sts_pairs  # noqa: E402
from modelpress.zoo.datasets import load_dataset  # noqa: E402
from modelpress.zoo.models import build_model  # noqa: E402

RECIPE = "sentence-encoder-distill-int8"
QUICK = ("stage.1.finetune.max_steps=10", "data=sentences?pairs=bundled", "eval.latency=false")


def load_recipe(quick: bool = False, overrides: tuple[str, ...] = ()) -> Recipe:
    return Recipe.load(RECIPE, [*overrides, *(QUICK if quick else ())])


def recipe_run(recipe: Recipe, quick: bool = False) -> RunResult:
    """``recipe`` run as ``modelpress compress`` does it. Full runs live in ``$MODELPRESS_CACHE/runs``
    under a key of the resolved recipe (a rerun resumes: finished stages are read back); quick runs
    in a temporary folder."""
    if quick:
        return compress(None, recipe, out=Path(tempfile.mkdtemp(prefix="minilm-quick-")))
    key = hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:10]
    return compress(None, recipe, out=cache_dir() / "runs" / f"{RECIPE}-{key}")


def distilled_student(teacher, run: RunResult) -> torch.nn.Module:
    """Stage 1 of the run (the distilled fp32 student), loaded from its artifact."""
    return load_artifact(run.out / "stages" / "01-shallow" / "model.safetensors", base_model=teacher)[0].eval()


def rows(quick: bool, overrides: tuple[str, ...] = ()) -> list[dict]:
    torch.manual_seed(0)
    teacher = build_model("minilm").eval()
    pairs = load_sts_pairs()
    batch = tokenize(teacher.tokenizer, pair_sentences(pairs)[:32])
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out = [{"row": "teacher MiniLM-L6 (6 layers)", "spearman": embedding_quality(teacher, pairs)["spearman"],
            "fidelity": 1.0, "params": n_params(teacher), "bytes": artifact_size_of(teacher), "lat": None}]
    data = load_dataset("sentences?pairs=bundled")
    for selection in ("uniform", "fidelity"):
        init, report = run_method(teacher, ShallowDistillation(keep=3, selection=selection),
                                  MethodInputs(data=data.train, task=data.task))
        q = embedding_quality(init.eval(), pairs, reference=teacher)
        out.append({"row": f"student, no training: layers {','.join(map(str, report.info['kept']))} "
                           f"(distill.shallow selection={selection})",
                    "spearman": q["spearman"], "fidelity": q["fidelity"], "params": n_params(init),
                    "bytes": artifact_size_of(init), "lat": None})
    recipe = load_recipe(quick, overrides)
    run = recipe_run(recipe, quick)
    student = distilled_student(teacher, run)
    q = embedding_quality(student, pairs, reference=teacher)
    lat = {}
    for threads in (1, 2):
        c = compare_latency(teacher, student, batch, threads=threads, warmup=3, repeats=5 if quick else 30,
                            min_time_s=0.0 if quick else 2.0)
        lat[threads] = (c.a.median_ms, c.b.median_ms, c.ratio)
    train = recipe.stages[0].finetune
    out.append({"row": f"student distilled by `modelpress compress -r {RECIPE}` stage 1: layers "
                       f"{','.join(map(str, run.infos[0]['kept']))}, {train.epochs:g} epoch(s), lr {train.lr:g}, "
                       f"{len(load_dataset(recipe.data).train):,} unlabelled sentences",
                "spearman": q["spearman"], "fidelity": q["fidelity"], "params": n_params(student),
                "bytes": artifact_size_of(student), "lat": lat,
                "target": lat[1][2] >= 1.8 and q["fidelity"] >= 0.95})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 training steps on the template corpus")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override the recipe, as `modelpress compress --set`")
    args = parser.parse_args()
    t0 = time.perf_counter()
    table = rows(args.quick, tuple(args.overrides))
    print("| model | spearman | fidelity | params | size (bytes) | batch 32, 1 thread (teacher -> student) | "
          "2 threads | target met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        lat = r["lat"]
        fmt = (lambda t: f"{lat[t][0]:.1f} -> {lat[t][1]:.1f} ms ({lat[t][2]:.2f}x)") if lat else (lambda t: "-")
        target = "" if "target" not in r else ("yes" if r["target"] else "no")
        print(f"| {r['row']} | {r['spearman']:.4f} | {r['fidelity']:.4f} | {r['params']:,} | {r['bytes']:,} | "
              f"{fmt(1)} | {fmt(2)} | {target} |")
    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores; target: >= 1.8x faster at batch 32 (1 thread), fidelity >= 0.95")


if __name__ == "__main__":
    main()
