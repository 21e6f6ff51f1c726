"""Calibration memory of a decoder against its depth: GPTQ and SparseGPT layer by layer, GPTQ also
with its layers' weights on disk (``offload="disk"``) (issue 19).

A Llama decoder (grouped-query attention, hidden 512, FFN 1,536, vocabulary 8,000, random init) with
2, 4 and 8 blocks is calibrated on 64 sequences of 256 tokens, each depth and method in its own
process. Reported: the weights' bytes, the process's resident memory before calibration (the model
and data loaded) and at its peak (``ru_maxrss``), and the difference: what calibration itself held.
Layer by layer (``modelpress.engine.layerwise``), calibration holds one group of layers' inputs and
statistics at a time, so the difference should not grow with depth, while the weights do. For
scale: the activations of every block for these batches would be ``blocks x 64 x 256 x 512 x 4`` bytes.

    python benchmarks/layerwise_memory.py            # ~13 minutes on 2 cores
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("MODELPRESS_PROGRESS", "0")

DEPTHS = (2, 4, 8)
METHODS = (("quant.gptq", "none"), ("prune.sparsegpt", "none"), ("quant.gptq", "disk"))
SEQS, TOKENS, HIDDEN, FFN, VOCAB = 64, 256, 512, 1536, 8000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def one(depth: int, method: str, offload: str) -> dict:
    import torch

    from modelpress.artifact.hf import import_transformers  # next to this machine's torchvision
    from modelpress.engine import MethodInputs, run_method
    from modelpress.engine.registry import build_config

    transformers = import_transformers()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=depth, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=TOKENS)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (SEQS, TOKENS))
    batches = [{"input_ids": ids[i:i + 8]} for i in range(0, SEQS, 8)]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    before = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    run_method(model, build_config(method, {"calibration_batches": len(batches), "offload": offload}),
               MethodInputs(data=batches), inplace=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"depth": depth, "method": method, "offload": offload, "weights_mb": weights / 2**20,
            "rss_before_mb": before, "peak_before_mb": peak_before, "peak_mb": peak, "seconds": time.perf_counter() - t,
            "all_activations_mb": depth * SEQS * TOKENS * HIDDEN * 4 / 2**20}


def main() -> None:
    if len(sys.argv) == 4:  # one measurement, in a fresh process
        print(json.dumps(one(int(sys.argv[1]), sys.argv[2], sys.argv[3])))
        return
    rows = []
    for method, offload in METHODS:
        for depth in DEPTHS:
            out = subprocess.run([sys.executable, __file__, str(depth), method, offload], capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| method | offload | blocks | weights MB | RSS before calibration MB | peak RSS MB | peak - before MB | "
          "every block's activations MB | calibration s |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['method']} | {r['offload']} | {r['depth']} | {r['weights_mb']:.1f} | {r['rss_before_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['peak_mb'] - r['rss_before_mb']:.0f} | {r['all_activations_mb']:.0f} | "
              f"{r['seconds']:.1f} |")
    print(f"\n{SEQS} sequences x {TOKENS} tokens in batches of 8; Llama hidden {HIDDEN}, FFN {FFN}, 8 heads / 2 "
          f"key-value heads, vocabulary {VOCAB}; {os.cpu_count()} CPU cores. Peak RSS includes the forward of the "
          "embedding and head, which do not depend on depth.")


if __name__ == "__main__":
    main()
