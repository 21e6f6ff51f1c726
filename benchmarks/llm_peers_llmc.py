"""llm-compressor worker for ``benchmarks/llm_peers.py``: one ``oneshot`` run in llm-compressor's own venv.

llm-compressor pins transformers (0.14.0.1: ``transformers<=5.17``) below modelpress' tested version, so it
cannot share modelpress' environment; ``llm_peers.py`` runs this file with the Python of a separate venv
(``$MODELPRESS_LLMC_PYTHON``, default ``/work/peers-venv/bin/python``) made with::

    python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

It imports nothing of modelpress. Input: a JSON job file (written by ``llm_peers.py``); output, in the job's
``out`` folder: ``model/`` (``save_pretrained(save_compressed=True)``: the compressed-tensors format that vLLM
and transformers load) and ``result.json`` (seconds in ``oneshot``, versions, the recipe as text).

    python benchmarks/llm_peers_llmc.py JOB.json
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def recipe_for(job: dict):
    """llm-compressor modifiers for ``job['algo']``: GPTQ / AWQ weight-only, or SmoothQuant + W8A8."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    bits, group, sym = job["bits"], job["group_size"], job["symmetric"]
    ignore = list(job.get("ignore") or [])
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group}
    w_only = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if job["algo"] == "GPTQ":
        return [GPTQModifier(config_groups=w_only, ignore=ignore)]
    if job["algo"] == "AWQ":
        from llmcompressor.modifiers.awq import AWQMapping, AWQModifier

        kw = {}
        if job.get("mappings"):
            kw["mappings"] = [AWQMapping(smooth, list(balance)) for smooth, balance in job["mappings"]]
        return [AWQModifier(config_groups=w_only, ignore=ignore, **kw)]
    if job["algo"] == "SmoothQuant":
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        kw = {}
        if job.get("smooth_mappings"):
            kw["mappings"] = [[list(balance), smooth] for smooth, balance in job["smooth_mappings"]]
        return [SmoothQuantModifier(smoothing_strength=job.get("alpha", 0.8), **kw),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    raise ValueError(f"unknown llm-compressor algorithm {job['algo']!r}")


class NoProcessor:
    """Stands in for a tokenizer where the model folder has none: the calibration data is already tokenized."""

    def save_pretrained(self, *args, **kwargs) -> None:
        pass


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    config = transformers.AutoConfig.from_pretrained(job["hf_dir"])
    arch = (config.architectures or ["AutoModel"])[0]
    model = getattr(transformers, arch).from_pretrained(job["hf_dir"], dtype=torch.float32).eval()
    batches = torch.load(job["calib"])  # list of {name: [batch, seq] int64 tensor}: the benchmark's own batches
    data = DataLoader(batches, batch_size=None)  # each item as it is: llm-compressor sees the same batches
    notes = []
    try:
        processor = transformers.AutoTokenizer.from_pretrained(job["hf_dir"])
    except Exception as exc:  # noqa: BLE001 - oneshot insists on a processor whenever it gets data
        processor = NoProcessor()
        notes.append(f"the folder has no tokenizer ({type(exc).__name__}); oneshot got a stand-in processor "
                     "(the data is already tokenized)")
    recipe = recipe_for(job)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, processor=processor, recipe=recipe,
            pipeline=job.get("pipeline") or "independent",
            **({"sequential_targets": job["sequential_targets"]} if job.get("sequential_targets") else {}))
    seconds = time.perf_counter() - t0
    model.save_pretrained(out / "model", save_compressed=True)
    result = {"seconds": seconds, "arch": arch, "notes": notes, "recipe": [repr(m) for m in recipe],
              "versions": {"llmcompressor": llmcompressor.__version__,
                           "compressed-tensors": compressed_tensors.__version__,
                           "transformers": transformers.__version__, "torch": torch.__version__}}
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
