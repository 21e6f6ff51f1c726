"""Transformer-era compression on real weights (issue 16), one run, one table per testbed: our rows (RTN,
GPTQ, AWQ, static / SmoothQuant W8A8, magnitude / Wanda / SparseGPT at 50% and 2:4) and the peer toolkits'
rows (``benchmarks/llm_peers.py``: ONNX Runtime's MatMulNBits quantizer RTN / GPTQ / HQQ, torchao, optimum-quanto,
llm-compressor GPTQ / AWQ / SmoothQuant) on the same model, the same calibration batches, int4 at group / block 128.

Testbeds (``--testbed``, default both):

* ``minilm``: the bundled all-MiniLM-L6-v2 (real pretrained weights). Quality: Spearman of cosine vs grade on the
  bundled graded pairs and fidelity (mean cosine to the fp32 embeddings). Calibration: 256 sentences of the
  ``everyday`` corpus (never the graded pairs), batches of 16. Latency input: one sentence (batch 1).
* ``pylm`` (``--tiny``: ``pylm-tiny``): the Llama-style decoder trained here (``src/modelpress/zoo/pylm.py``,
  cached in ``$MODELPRESS_CACHE/lm``; trained on first use: ~40 min for pylm, a minute for pylm-tiny).
  Quality: perplexity and top-1 next-token accuracy on 256 evenly spaced held-out blocks, and the perplexity's
  change from fp32 eager. Calibration: the first 16 batches of the training split (8 blocks each). Latency at
  batch 1 on two inputs, neither of them a real decode step (no KV cache is exported): **one token** (seq len 1:
  the same per-layer GEMVs as a decode step, without attention over a cache: "decode-step proxy") and **one
  whole block** (128 tokens for pylm, 64 for pylm-tiny: a prefill).

Every row of ours goes through ``modelpress.engine.run_method`` (what e.g. ``modelpress quantize gptq -m minilm -d
sts --set bits=4 --set group_size=128`` runs) and is one line "PyTorch eager" (quality of the model in PyTorch,
bytes of the modelpress artifact); the weight-only rows are also deployed with ``export_deployable(...,
accuracy_level=4)`` (ONNX Runtime ``MatMulNBits``: int8 activations; the int4 rows again at level 0, fp32
compute, exact, except under ``--quick``) and the W8A8 rows as int8 QDQ: one more line each, scored through ONNX
Runtime.

Columns: the testbed's quality; bytes and what they are bytes of; bits per quantized weight (ONNX rows:
(packed weights + scales + zero points) / quantized weights, from the MatMulNBits initializers; eager peers: the
bytes their tensor subclasses hold); calibration / quantization seconds (the deploy line repeats its method's);
batch-1 latency vs fp32 at 1 and 2 threads: ONNX rows against the fp32 ONNX Runtime file, eager peer rows against
the fp32 eager model, each pair timed alternately in one process (``compare_latency``; medians; the ratios move
by ~0.3 between runs on a shared box). Below each table: issue 16's goals (int4 deploy <= 4.3 bits / weight,
decode >= 1.5x faster than fp32 ORT, quality no worse than ONNX Runtime's own int4 quantizer; each layer-wise
method's loss at most half its baseline's).

    python benchmarks/llm.py                              # both testbeds, every row and peer (~1 h on 2 idle cores)
    python benchmarks/llm.py --quick                      # fewer rows and peers, fewer timings (~20 min)
    python benchmarks/llm.py --tiny --quick --testbed pylm    # pylm-tiny: a few minutes
    python benchmarks/llm.py --testbed minilm --peers ort-rtn --only 'RTN|GPTQ'
    python benchmarks/llm.py --no-peers                   # ours only

``--quick`` runs the rows in ``QUICK`` (RTN / GPTQ / AWQ w4, static and SmoothQuant W8A8 minmax, magnitude and
SparseGPT 50%), the peers in ``llm_peers.QUICK``, no accuracy_level 0 lines and 10 timed calls instead of 30.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import llm_peers as lp  # noqa: E402
from llm_peers import OrtModule, Settings, Testbed, first_line, latency, onnx_bits, row  # noqa: E402

from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.engine import MethodInputs, run_method  # noqa: E402
from modelpress.export.deploy import export_deployable  # noqa: E402
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
MINILM_ONLY = {"RTN w4 g128, MSE ranges", "GPTQ w4 g128, MSE ranges", "static W8A8, percentile",
               "SmoothQuant W8A8, percentile", "SmoothQuant W8A8 alpha 0.5, percentile"}
QUICK = {"RTN w4 g128", "GPTQ w4 g128", "AWQ w4 g128", "static W8A8, minmax", "SmoothQuant W8A8, minmax",
         "magnitude 50%", "SparseGPT 50%"}
# method row -> the row it should lose at most half as much quality as (issue 16's goals)
GOALS = {"GPTQ w4 g128": "RTN w4 g128", "GPTQ w3 g128": "RTN w3 g128", "AWQ w4 g128": "RTN w4 g128",
         "AWQ w3 g128": "RTN w3 g128", "Wanda 50%": "magnitude 50%",
         "SparseGPT 50%": "magnitude 50%", "Wanda 2:4": "magnitude 2:4", "SparseGPT 2:4": "magnitude 2:4"}
# testbed -> (quality key the goals judge, +1 higher is better / -1 lower is better; a key shown vs fp32)
PRIMARY = {"minilm": ("fidelity", 1, None), "pylm": ("perplexity", -1, "perplexity"),
           "pylm-tiny": ("perplexity", -1, "perplexity")}
WEIGHT_ONLY = (WeightOnly, GPTQ, AWQ)


def rows_for(testbed: str, quick: bool = False, only: str | None = None) -> list[tuple[str, object]]:
    return [(name, cfg) for name, cfg in ROWS
            if (testbed == "minilm" or name not in MINILM_ONLY) and (not quick or name in QUICK)
            and (not only or re.search(only, name))]


def deploy_rows(tb: Testbed, s: Settings, model, name: str, cfg, seconds: float, levels: tuple[int, ...]) -> list:
    """The deployed file of one of our rows, scored and timed through ONNX Runtime (a failure is a row)."""
    out = []
    for level in levels if isinstance(cfg, WEIGHT_ONLY) else (None,):
        label = name if level in (None, 4) else f"{name}, accuracy_level {level}"
        runtime = ("ONNX Runtime, int8 QDQ" if level is None else f"ONNX Runtime, MatMulNBits accuracy_level {level}")
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        try:
            path, note = export_deployable(model, tb.example, tb.workdir / f"{slug}.onnx",
                                           accuracy_level=4 if level is None else level)
            bpw, layers = onnx_bits(path)
            out.append(row(label, runtime=runtime, quality=tb.evaluate(OrtModule(path)), bytes=path.stat().st_size,
                           bytes_of=".onnx", bpw=bpw, seconds=seconds, lat=latency(tb, s, tb.onnx(), path),
                           note=note + (f"; {layers} MatMulNBits" if layers else "")))
        except Exception as exc:  # noqa: BLE001 - a deploy failing is a result to print
            out.append(row(f"{label}: deploy failed", runtime=runtime, failed=True, note=first_line(exc)))
    return out


def our_rows(tb: Testbed, s: Settings, name: str, cfg, deploy: bool = True, levels: tuple[int, ...] = (4, 0)) -> list:
    """One of our methods through ``run_method``: its eager row, then its deployed rows."""
    t0 = time.perf_counter()
    model, _ = run_method(tb.model, cfg, MethodInputs(data=tb.calib, task=tb.task))
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        quality = tb.evaluate(model)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = save_artifact(model, tb.workdir / f"{slug}.safetensors")
    note = "" if isinstance(cfg, (StaticInt8, *WEIGHT_ONLY)) else "sparse weights, dense kernels: no deploy line"
    out = [row(name, runtime="PyTorch eager", quality=quality, bytes=path.stat().st_size,
               bytes_of="modelpress artifact", seconds=seconds, note=note)]
    if deploy and isinstance(cfg, (StaticInt8, *WEIGHT_ONLY)):
        out += deploy_rows(tb, s, model, name, cfg, seconds, levels if getattr(cfg, "bits", 4) == 4 else (4,))
    return out


def run_testbed(tb: Testbed, s: Settings, rows: list, peers: list[str], deploy: bool = True,
                levels: tuple[int, ...] = (4, 0)) -> list[dict]:
    """fp32 (eager and ONNX Runtime), our rows, then the peers' rows, printing each as it is done."""
    table = lp.fp32_rows(tb, s)
    for r in table:
        lp.print_row(r)
    for name, cfg in rows:
        for r in our_rows(tb, s, name, cfg, deploy=deploy, levels=levels):
            table.append(r)
            lp.print_row(r)
    for key in peers:
        table.append(lp.run_peer(key, tb, s))
        lp.print_row(table[-1])
    return table


def print_goals(table: list[dict], key: str, sign: int, decode: str | None) -> None:
    """Issue 16's goals on ``table``: int4 deploy vs fp32 ORT and vs ONNX Runtime's int4 quantizer; each
    layer-wise method's loss of ``key`` (``sign`` +1: higher is better) vs its baseline's."""
    def q(r):
        return (r["quality"] or {}).get(key)

    fp32 = q(table[0])
    eager = {r["row"]: r for r in table if r["runtime"] == "PyTorch eager" and q(r) is not None}
    ort_peers = [r for r in table if r["row"].startswith("ORT MatMulNBitsQuantizer") and q(r) is not None]
    ours = [r for r in table if "MatMulNBits accuracy_level 4" in r["runtime"] and " w4 " in f"{r['row']} "
            and q(r) is not None]
    if ours:
        print(f"\nint4 deploy goals (<= 4.3 bits / weight; {decode or 'batch 1'} >= 1.5x faster than fp32 ORT; "
              f"{key} no worse than ONNX Runtime's own int4 quantizer):")
    for r in ours:
        lat = {t: v[2] for (label, t), v in (r["lat"] or {}).items() if decode is None or label == decode}
        parts = [f"{r['bpw']:.2f} bits ({'met' if r['bpw'] <= 4.3 else 'not met'})"]
        parts += [f"{ratio:.2f}x at {t} thread{'s' if t > 1 else ''} ({'met' if ratio >= 1.5 else 'not met'})"
                  for t, ratio in sorted(lat.items())]
        parts += [f"{key} {q(r):.4f} vs {p['row']} {q(p):.4f} ({'met' if sign * (q(r) - q(p)) >= 0 else 'not met'})"
                  for p in ort_peers]
        print(f"- {r['row']}: " + "; ".join(parts))
    lines = []
    for method, base in GOALS.items():
        if method in eager and base in eager:
            lm, lb = sign * (fp32 - q(eager[method])), sign * (fp32 - q(eager[base]))
            frac = lm / lb if lb > 0 else float("nan")
            lines.append(f"- {method} vs {base}: {lm:+.4f} / {lb:+.4f} = {frac:.2f} "
                         f"({'met' if frac <= 0.5 else 'not met'})")
    if lines:
        print(f"\nLoss of {key} vs fp32 as a fraction of the baseline method's (PyTorch eager; goal: <= 0.5):")
        print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", choices=["minilm", "pylm", "all"], default="all")
    ap.add_argument("--tiny", action="store_true", help="pylm-tiny instead of pylm (a fast check)")
    ap.add_argument("--quick", action="store_true", help="fewer rows and peers, no accuracy_level 0, fewer timings")
    ap.add_argument("--only", default=None, help="regular expression: only our rows / peer labels that match")
    ap.add_argument("--peers", default="", help=f"comma-separated peer keys (default all; {', '.join(lp.PEERS)})")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-deploy", action="store_true", help="no ONNX lines for our rows")
    ap.add_argument("--eval-blocks", type=int, default=256, help="pylm: held-out blocks scored (0: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for calibration and eager scoring")
    ap.add_argument("--workdir", default="", help="keep the files here (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.peers and args.no_peers:
        ap.error("--peers and --no-peers")
    if args.no_peers:
        peers = []
    elif args.peers:
        peers = [p for p in args.peers.split(",") if p]
        if sorted(set(peers) - set(lp.PEERS)):
            ap.error(f"unknown peers {sorted(set(peers) - set(lp.PEERS))}; known: {', '.join(lp.PEERS)}")
    else:
        peers = [k for k in (lp.QUICK if args.quick else lp.PEERS)
                 if not args.only or re.search(args.only, lp.PEER_LABELS[k])]
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mp-llm-"))
    beds = ["minilm", "pylm"] if args.testbed == "all" else [args.testbed]
    beds = [("pylm-tiny" if args.tiny else "pylm") if b == "pylm" else b for b in beds]
    s = Settings(repeats=10 if args.quick else 30)
    levels = (4,) if args.quick else (4, 0)
    t_all, load0 = time.perf_counter(), os.getloadavg()[0]
    for bed in beds:
        t0 = time.perf_counter()
        (workdir / bed).mkdir(parents=True, exist_ok=True)
        if bed.startswith("pylm"):
            tb = lp.TESTBEDS[bed](workdir / bed, eval_blocks=args.eval_blocks or None)
        else:
            tb = lp.TESTBEDS[bed](workdir / bed)
        print(f"\n== {tb.name}: {tb.notes}", flush=True)
        table = run_testbed(tb, s, rows_for(bed, args.quick, args.only), peers, deploy=not args.no_deploy,
                            levels=levels)
        key, sign, delta = PRIMARY[bed]
        lp.print_table(table, f"{tb.name}: {tb.notes}; {time.perf_counter() - t0:.0f} s", delta=delta)
        print_goals(table, key, sign, next(iter(tb.timing_inputs())) if bed.startswith("pylm") else None)
    versions = lp.peer_versions() if peers else {"torch": torch.__version__}
    print("\n" + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; torch threads {args.threads} (calibration); {os.cpu_count()} CPU cores, load average {load0:.1f} at "
          f"the start, {os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - t_all:.0f} s; files in {workdir}")


if __name__ == "__main__":
    main()
