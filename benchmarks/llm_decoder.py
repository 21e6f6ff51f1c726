"""Transformer-era compression on the decoder testbed (issue 16), our rows only: GPTQ and AWQ vs
round-to-nearest, SmoothQuant vs plain static W8A8, SparseGPT / Wanda vs magnitude, judged by held-out
perplexity of a small Llama trained here. A thin entry point over ``benchmarks/llm.py`` (``--testbed pylm
--no-peers``), which holds the rows, the goals and the table; ``llm.py`` runs the same rows with the peers
and the ONNX Runtime deploy / latency lines.

Testbed: ``pylm`` (``src/modelpress/zoo/pylm.py``): a Llama-style decoder (RMSNorm, rotary, SwiGLU,
grouped-query attention; 4.7M parameters) trained once on the Python standard library's top-level
modules and cached in ``$MODELPRESS_CACHE/lm``; quality = perplexity on held-out files (never trained
or calibrated on), ``eval_blocks`` evenly spaced blocks of 128 tokens. Calibration: the first 16
batches of the training split (128 blocks of 128 tokens, shuffled once with seed 0). Every row goes
through ``modelpress.engine.run_method`` (what ``modelpress quantize gptq -m pylm -d pystdlib`` runs).

Columns: perplexity, top-1 next-token accuracy, the perplexity's change from fp32, artifact bytes,
calibration seconds (``--deploy``: also the ONNX Runtime lines with bits / weight and latency); below the
table, each layer-wise method's loss as a fraction of its baseline's (the issue's goal: at most 0.5).

    python benchmarks/llm_decoder.py            # trains pylm first if not cached (once; 39 min on a busy 2-core box)
    python benchmarks/llm_decoder.py --tiny     # pylm-tiny on pystdlib-tiny, a minute
    python benchmarks/llm_decoder.py --only 'GPTQ|RTN'   # some rows

``decoder_testbed()`` gives the model, calibration batches and evaluation function for other scripts
(``llm_peers.pylm_testbed`` the same as a peers ``Testbed``).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable

import llm
from llm_peers import pylm_testbed
from torch import nn


def decoder_testbed(model: str = "pylm", eval_blocks: int | None = 256, calibration_batches: int = 16,
                    seed: int = 0) -> tuple[nn.Module, list, Callable[[nn.Module], dict], object]:
    """``(fp32 model, calibration batches, evaluate(model) -> {"perplexity", "token_accuracy"}, bundle)``
    of the decoder testbed ``model`` (``"pylm"`` or ``"pylm-tiny"``; trained and cached on first use)."""
    tb = pylm_testbed(Path(tempfile.mkdtemp(prefix="mp-llm-decoder-")), model, eval_blocks, calibration_batches, seed)
    bundle = tb._cache["bundle"]
    return tb.model, tb.calib, bundle.evaluate, bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="pylm-tiny on pystdlib-tiny (seconds)")
    ap.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks scored (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="regular expression: run only the matching rows (fp32 always)")
    ap.add_argument("--deploy", action="store_true", help="also the ONNX Runtime lines (export, latency)")
    args = ap.parse_args()
    argv = ["--testbed", "pylm", "--no-peers", "--eval-blocks", str(args.eval_blocks), "--threads", str(args.threads)]
    argv += ["--tiny"] * args.tiny + (["--only", args.only] if args.only else []) + ["--no-deploy"] * (not args.deploy)
    llm.main(argv)


if __name__ == "__main__":
    main()
