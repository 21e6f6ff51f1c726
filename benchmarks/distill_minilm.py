"""A 3-layer MiniLM student distilled from the 6-layer teacher on unlabeled sentences (issue 5, task 2).

* teacher: the bundled all-MiniLM-L6-v2 (mean pooling, L2-normalised embeddings);
* student: ``bert_student(teacher, every=2)``: teacher layers 1, 3, 5 (DistilBERT-style init);
* data: the bundled unlabeled sentences (``load_sentences``) minus the 208 sentences of the graded
  STS pairs used for evaluation (2,400 left), tokenized to at most 64 tokens; targets are the teacher's
  embeddings, computed once; loss ``1 - cos(student, teacher)`` (embedding distillation, no labels);
* training: AdamW, cosine schedule, batch 32, seed 0.

Reported: Spearman on the bundled graded pairs, fidelity (mean cosine to the teacher's
embeddings of the pair sentences), parameters, artifact bytes and batch-32 latency teacher /
student (``compare_latency``, alternating in one process). Targets: >= 1.8x faster, fidelity >= 0.95.

    python benchmarks/distill_minilm.py           # full run (~3-4 minutes on 2 cores)
    python benchmarks/distill_minilm.py --quick   # smoke run
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

os.environ.setdefault("MODELPRESS_PROGRESS", "0")

from modelpress import TrainConfig  # noqa: E402
from modelpress.analysis.latency import compare_latency  # noqa: E402
from modelpress.core.data import call_model  # noqa: E402
from modelpress.core.training import fit  # noqa: E402
from modelpress.distillation.students import bert_student  # noqa: E402
from modelpress.export.checkpoint import artifact_size_of  # noqa: E402
from modelpress.zoo.models import build_model  # noqa: E402
from modelpress.zoo.text import (TokenizedSentences, embedding_quality, load_sentences, load_sts_pairs,  # noqa: E402
                                 pair_sentences, tokenize)


class WithTargets(Dataset):
    """Tokenized sentences paired with the teacher's embedding of each."""

    def __init__(self, tokens: TokenizedSentences, targets: torch.Tensor):
        self.tokens, self.targets = tokens, targets

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i], self.targets[i]


def cosine_distillation(model, inputs, target):
    return (1 - F.cosine_similarity(call_model(model, inputs), target, dim=-1)).mean()


def rows(quick: bool, epochs: float = 6, lr: float = 2e-4) -> list[dict]:
    torch.manual_seed(0)
    teacher = build_model("minilm").eval()
    pairs = load_sts_pairs()
    held_out = set(pair_sentences(pairs))  # evaluation sentences never reach training
    sentences = [s for s in load_sentences() if s not in held_out][:256 if quick else None]
    tokens = TokenizedSentences.from_sentences(sentences, max_length=64, tokenizer=teacher.tokenizer)
    with torch.no_grad():
        targets = torch.cat([teacher(**{k: v[i:i + 64] for k, v in tokens.tokens.items()})
                             for i in range(0, len(tokens), 64)])
    batch = tokenize(teacher.tokenizer, pair_sentences(pairs)[:32])
    q0 = embedding_quality(teacher, pairs)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out = [{"row": "teacher MiniLM-L6 (6 layers)", "spearman": q0["spearman"], "fidelity": 1.0,
            "params": n_params(teacher), "bytes": artifact_size_of(teacher), "lat": None, "seconds": 0.0}]

    student = bert_student(teacher, every=2)
    q = embedding_quality(student.eval(), pairs, reference=teacher)
    out.append({"row": "student: layers 1,3,5 of the teacher, no training", "spearman": q["spearman"],
                "fidelity": q["fidelity"], "params": n_params(student), "bytes": artifact_size_of(student),
                "lat": None, "seconds": 0.0})
    cfg = TrainConfig(epochs=1 if quick else epochs, lr=1e-4 if quick else lr, optimizer="adamw", batch_size=32,
                      max_steps=10 if quick else None)
    t = time.perf_counter()
    torch.manual_seed(0)
    fit(student, WithTargets(tokens, targets), cfg, loss_fn=cosine_distillation, description="distill")
    secs = time.perf_counter() - t
    student.eval()
    q = embedding_quality(student, pairs, reference=teacher)
    lat = {}
    for threads in (1, 2):
        c = compare_latency(teacher, student, batch, threads=threads, warmup=3, repeats=5 if quick else 30,
                            min_time_s=0.0 if quick else 2.0)
        lat[threads] = (c.a.median_ms, c.b.median_ms, c.ratio)
    out.append({"row": f"student distilled ({cfg.epochs:g} epochs, {len(tokens):,} unlabeled sentences, cosine loss)",
                "spearman": q["spearman"], "fidelity": q["fidelity"], "params": n_params(student),
                "bytes": artifact_size_of(student), "lat": lat, "seconds": secs,
                "target": lat[1][2] >= 1.8 and q["fidelity"] >= 0.95})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 sentences, 10 steps")
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args()
    t0 = time.perf_counter()
    table = rows(args.quick, args.epochs, args.lr)
    print("| model | spearman | fidelity | params | size (bytes) | batch 32, 1 thread (teacher -> student) | "
          "2 threads | train s | target met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        lat = r["lat"]
        fmt = (lambda t: f"{lat[t][0]:.1f} -> {lat[t][1]:.1f} ms ({lat[t][2]:.2f}x)") if lat else (lambda t: "-")
        target = "" if "target" not in r else ("yes" if r["target"] else "no")
        print(f"| {r['row']} | {r['spearman']:.4f} | {r['fidelity']:.4f} | {r['params']:,} | {r['bytes']:,} | "
              f"{fmt(1)} | {fmt(2)} | {r['seconds']:.0f} | {target} |")
    print(f"\n{'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores; target: >= 1.8x faster at batch 32 (1 thread), fidelity >= 0.95")


if __name__ == "__main__":
    main()
