"""Transformer-era compression on the decoder testbed (issue 16): GPTQ and AWQ vs round-to-nearest,
SmoothQuant vs plain static W8A8, SparseGPT / Wanda vs magnitude, judged by held-out perplexity of a
small Llama trained here.

Testbed: ``pylm`` (``src/modelpress/zoo/pylm.py``): a Llama-style decoder (RMSNorm, rotary, SwiGLU,
grouped-query attention; 4.7M parameters) trained once on the Python standard library's top-level
modules and cached in ``$MODELPRESS_CACHE/lm``; quality = perplexity on held-out files (never trained
or calibrated on), ``eval_blocks`` evenly spaced blocks of 128 tokens. Calibration: the first 16
batches of the training split (128 blocks of 128 tokens, shuffled once with seed 0). Every row goes
through ``modelpress.engine.run_method`` (what ``modelpress quantize gptq -m pylm -d pystdlib`` runs).

Columns: perplexity, its change from fp32 (``loss``), top-1 next-token accuracy, artifact bytes,
calibration seconds; below the table, each layer-wise method's loss as a fraction of its baseline's
(the issue's goal: at most 0.5).

    python benchmarks/llm_decoder.py            # trains pylm first if not cached (once; 39 min on a busy 2-core box)
    python benchmarks/llm_decoder.py --tiny     # pylm-tiny on pystdlib-tiny, a minute
    python benchmarks/llm_decoder.py --only 'GPTQ|RTN'   # some rows

``decoder_testbed()`` gives the model, calibration batches and evaluation function for other scripts.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.engine import MethodInputs, run_method  # noqa: E402
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
    ("RTN w3 g128", WeightOnly(bits=3, granularity="group", group_size=128)),
    ("GPTQ w3 g128", GPTQ(bits=3, group_size=128)),
    ("AWQ w4 g128", AWQ(bits=4, group_size=128)),
    ("AWQ w3 g128", AWQ(bits=3, group_size=128)),
    ("static W8A8, minmax", StaticInt8(observer="minmax")),
    ("SmoothQuant W8A8, minmax", SmoothQuant(observer="minmax")),
    ("magnitude 50%", MagnitudePruning(sparsity=0.5, ranking="layer")),
    ("Wanda 50%", Wanda()),
    ("SparseGPT 50%", SparseGPT()),
    ("magnitude 2:4", NMSparsity()),
    ("Wanda 2:4", Wanda(pattern="2:4")),
    ("SparseGPT 2:4", SparseGPT(pattern="2:4")),
]
# method row -> the row it should lose at most half as much perplexity as (issue 16's goals)
GOALS = {"GPTQ w4 g128": "RTN w4 g128", "GPTQ w3 g128": "RTN w3 g128", "AWQ w4 g128": "RTN w4 g128",
         "AWQ w3 g128": "RTN w3 g128", "Wanda 50%": "magnitude 50%",
         "SparseGPT 50%": "magnitude 50%", "Wanda 2:4": "magnitude 2:4", "SparseGPT 2:4": "magnitude 2:4"}


def decoder_testbed(model: str = "pylm", eval_blocks: int | None = 256, calibration_batches: int = 16,
                    seed: int = 0) -> tuple[nn.Module, list, Callable[[nn.Module], dict], object]:
    """``(fp32 model, calibration batches, evaluate(model) -> {"perplexity", "token_accuracy"}, bundle)``
    of the decoder testbed ``model`` (``"pylm"`` or ``"pylm-tiny"``; trained and cached on first use)."""
    from modelpress.zoo.datasets import load_dataset
    from modelpress.zoo.models import build_model
    from modelpress.zoo.pylm import TESTBEDS

    bed = TESTBEDS[model]
    spec = f"{bed.dataset}?eval_blocks={eval_blocks or 0}"
    bundle = load_dataset(spec, seed=seed)
    dense = build_model(model).eval()
    calib = list(itertools.islice(bundle.train, calibration_batches))
    return dense, calib, bundle.evaluate, bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="pylm-tiny on pystdlib-tiny (seconds)")
    ap.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks scored (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="regular expression: run only the matching rows (fp32 always)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = "pylm-tiny" if args.tiny else "pylm"
    t0 = time.perf_counter()
    dense, calib, evaluate, bundle = decoder_testbed(name, eval_blocks=args.eval_blocks or None)
    setup = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="mp-llm-decoder-"))
    n_params = sum(p.numel() for p in dense.parameters())
    print(f"{name}: {n_params:,} parameters, {len(bundle.test)} held-out blocks of {bundle.meta['block']} tokens, "
          f"calibration {len(calib)} batches of {calib[0]['input_ids'].shape[0]} (setup {setup:.0f} s)", flush=True)

    base = evaluate(dense)
    table = [{"row": "fp32", **base, "seconds": 0.0,
              "bytes": save_artifact(dense, tmp / "fp32.safetensors").stat().st_size}]
    for row, cfg in ROWS:
        if args.only and not re.search(args.only, row):
            continue
        t0 = time.perf_counter()
        model, _ = run_method(dense, cfg, MethodInputs(data=calib, task=bundle.task))
        seconds = time.perf_counter() - t0
        q = evaluate(model.eval())
        table.append({"row": row, **q, "seconds": seconds,
                      "bytes": save_artifact(model, tmp / f"{len(table)}.safetensors").stat().st_size})
        print(f"{row}: perplexity {q['perplexity']:.3f} ({seconds:.1f} s)", flush=True)
    print_table(table, base["perplexity"])


def print_table(table: list[dict], fp32: float) -> None:
    print("\n| row | perplexity | loss vs fp32 | token accuracy | artifact bytes | calibration s |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['row']} | {r['perplexity']:.3f} | {r['perplexity'] - fp32:+.3f} | "
              f"{100 * r['token_accuracy']:.2f}% | {r['bytes']:,} | {r['seconds']:.1f} |")
    by = {r["row"]: r["perplexity"] - fp32 for r in table}
    print("\nLoss as a fraction of the baseline method's (goal: <= 0.5):")
    for row, ref in GOALS.items():
        if row in by and ref in by:
            frac = by[row] / by[ref] if by[ref] > 0 else float("nan")
            print(f"- {row} vs {ref}: {by[row]:+.3f} / {by[ref]:+.3f} = {frac:.2f}"
                  f" {'(met)' if frac <= 0.5 else '(not met)'}")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
