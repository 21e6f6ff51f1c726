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


def recipe_for(job: dict) -> list:
    """llm-compressor modifiers for ``job['algo']``: GPTQ / AWQ weight-only, or SmoothQuant + W8A8."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    bits, group, sym = job["bits"], job["group_size"], job["symmetric"]
    ignore = list(job.get("ignore") or [])
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group}
    w_only = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if job["algo"] == "GPTQ":
        return [GPTQModifier(config_groups=w_only, ignore=ignore)]
    if job["algo"] == "AWQ":  # the scales, then round-to-nearest on the scaled weights (llm-compressor's split)
        from llmcompressor.modifiers.transform import AWQMapping, AWQModifier

        kw = {}
        if job.get("mappings"):
            kw["mappings"] = [AWQMapping(smooth, list(balance)) for smooth, balance in job["mappings"]]
        return [AWQModifier(**kw), QuantizationModifier(config_groups=w_only, ignore=ignore)]
    if job["algo"] == "SmoothQuant":  # llm-compressor's example follows with GPTQModifier; RTN here (int8 weights)
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        kw = {}
        if job.get("smooth_mappings"):
            kw["mappings"] = [[list(balance), smooth] for smooth, balance in job["smooth_mappings"]]
        return [SmoothQuantModifier(smoothing_strength=job.get("alpha", 0.8), **kw),
                QuantizationModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    raise ValueError(f"unknown llm-compressor algorithm {job['algo']!r}")


PIN_NOTE = ("llm-compressor pins cached activations (Tensor.pin_memory: 'RuntimeError: Cannot access accelerator "
            "device when none is available.' on a machine without one); the worker made IntermediatesCache.pin_memory "
            "a no-op (pinning only speeds host-to-accelerator copies)")


def skip_pinning_without_accelerator() -> list[int]:
    """Make llm-compressor's activation-cache pinning a no-op on a CPU-only machine (AWQ calls it; it raises there).
    Returns the list the patched method appends to, so the run can say whether it was needed."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    calls: list[int] = []
    if torch.accelerator.is_available():
        return calls

    def pin_memory(self, batch_index: int, input_names=None) -> None:
        calls.append(batch_index)

    IntermediatesCache.pin_memory = pin_memory
    return calls


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
    pinned = skip_pinning_without_accelerator()
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, processor=processor, recipe=recipe,
            pipeline=job.get("pipeline") or "independent",
            **({"sequential_targets": job["sequential_targets"]} if job.get("sequential_targets") else {}))
    seconds = time.perf_counter() - t0
    if pinned:
        notes.append(PIN_NOTE)
    model.save_pretrained(out / "model", save_compressed=True)
    result = {"seconds": seconds, "arch": arch, "notes": notes, "recipe": [repr(m) for m in recipe],
              "versions": {"llmcompressor": llmcompressor.__version__,
                           "compressed-tensors": compressed_tensors.__version__,
                           "transformers": transformers.__version__, "torch": torch.__version__}}
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
