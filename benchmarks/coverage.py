"""Coverage matrix: every registered method x real architectures (issue 15).

Rows: each registered method (plus ``baseline``: the uncompressed model through the same checks)
on each model of

* ``torchvision``: every classification model of ``torchvision.models`` up to ``--max-params``;
* ``timm``: 40 models spanning ViT, DeiT, Swin, ConvNeXt, EfficientNet, RegNet, MobileNetV3 and
  ResNet variants (:data:`TIMM_MODELS`);
* ``hf``: Hugging Face families from local config folders (random weights, nothing downloaded),
  small but realistic: real widths and head counts, grouped-query attention for Llama / Qwen2 /
  Mistral, 2 layers, vocabularies cut to 8k (:data:`HF_FAMILIES`);
* ``nn``: plain torch models built from ``nn.TransformerEncoderLayer``, ``nn.LSTM``, ``nn.GRU``.

Every (method, model) runs in its own process, forked from this one after it imported torch,
modelpress and the model libraries (so a run starts at once), killed after ``--timeout`` seconds
or above ``--max-rss`` GB; one JSON line per finished pair goes to ``--results``, and a rerun
skips the pairs already there (``--redo raw,timeout`` runs those again). A log per run (stdout,
stderr, the traceback of a raw exception) is written to ``logs/`` beside the results. Columns:

* status: ``ok``; ``skipped`` (the product refused the model as outside the method's reach:
  ``UnsupportedError`` / ``ScopeError`` / ``MissingDependencyError``, its message shown);
  ``error`` (another ``ModelpressError``, message shown); ``raw`` (any other exception escaped
  ``run_method``: a bug; type, first line, the deepest ``src/modelpress`` frame and the deepest
  frame of all); ``timeout``; ``oom`` (killed above ``--max-rss``);
* requested: what the config of :data:`METHOD_CONFIGS` asks for;
* params / nonzero / MACs / size: kept fraction of ``p.numel()`` summed over parameters (weights a
  quantizer moves into integer buffers do not count: ~0 for them), of non-zero parameter values,
  of ``count_macs(model, one example).total`` and of the artifact's bytes;
* runs: the compressed model runs on the example input with the original output shape (``no``:
  another shape; ``raw``: it raises);
* reload: the artifact (``save_artifact`` -> ``load_artifact``, rebuilt from the recorded
  source) gives the compressed model's outputs (``yes``) or not;
* onnx: ``export_deployable(..., check=True)`` ran the file in ONNX Runtime and it matched;
* TP params: Torch-Pruning (a peer, never imported by the product; ``MetaPruner``, L1 magnitude,
  ``pruning_ratio=0.3``, layers as wide as the output ignored, same example input) on the same
  model, shown on the ``prune.channels`` rows: its kept parameter fraction, or why it failed;
* note: layers the method left as they are, and what went wrong in the checks.

A raw exception in a check (runs / reload / onnx / MACs) is counted and listed too.

Usage::

    python benchmarks/coverage.py --list                        # the catalog, parameter counts
    python benchmarks/coverage.py --quick --timeout 180 --markdown benchmarks/results/coverage.md
    python benchmarks/coverage.py --families hf,nn --methods 'prune.*'
    python benchmarks/coverage.py --models 'timm:vit*' --methods quant.static_int8 --redo raw,timeout
    python benchmarks/coverage.py --report a.jsonl,b.jsonl --markdown m.md  # runs split across processes

Models are randomly initialised (nothing is downloaded). Data are random: 4 batches of 4
(images at ``--image-size`` px, or the model's native size when it does not run there; 16
tokens of text, one sentence padded), a label per sample for classifiers, next-token labels
``(B, T)`` for causal LMs (Hugging Face's convention), none for sentence encoders (task
``SentenceEmbedding``). Methods that train get ``TrainConfig(max_steps=2)``; the others get no
training, so the engine does not fine-tune; distillation methods get the model itself as teacher.
``tests/test_coverage.py`` runs a subset of the methods on tiny variants (:func:`tiny_catalog`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MODELPRESS_PROGRESS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.artifact.hf import import_transformers  # noqa: E402
from modelpress.artifact.loading import load_artifact, load_model  # noqa: E402
from modelpress.core.compat import prepare_torchvision  # noqa: E402
from modelpress.core.data import call_model, slice_inputs  # noqa: E402
from modelpress.core.errors import MissingDependencyError, ModelpressError, ScopeError, UnsupportedError  # noqa: E402
from modelpress.core.training import TrainConfig  # noqa: E402
from modelpress.engine import MethodInputs, list_methods, run_method  # noqa: E402
from modelpress.export.deploy import export_deployable  # noqa: E402
from modelpress.nn.macs import count_macs  # noqa: E402
from modelpress.tasks import Classification, SentenceEmbedding  # noqa: E402

HERE = Path(__file__).resolve()
FAMILIES = ("torchvision", "timm", "hf", "nn")
STATUSES = ("ok", "skipped", "error", "raw", "timeout", "oom")
SKIP_ERRORS = (UnsupportedError, ScopeError, MissingDependencyError)  # "not for this model", said on purpose

# -- the config of each method ---------------------------------------------------------------------
# name -> (config keywords, what the row requests). Defaults except: an explicit ratio for
# structured pruning (issue 15: 30% of the channels), FFN neurons as well as heads for
# prune.heads, a budget for mixed precision, and fewer optimisation iterations where the default
# costs minutes per layer on a 2-core machine (the matrix is about whether a method runs on an
# architecture; tests/ and the other benchmarks check quality at the defaults).
METHOD_CONFIGS: dict[str, tuple[dict, str]] = {
    "prune.channels": ({"ratio": 0.3}, "30% of channels"),
    "prune.heads": ({"head_ratio": 0.25, "ffn_ratio": 0.25}, "25% heads, 25% FFN"),
    "prune.iterative": ({}, "sparsity 0.5/0.75/0.9"),
    "prune.magnitude": ({}, "sparsity 0.5"),
    "prune.nm": ({}, "2:4"),
    "prune.sparsegpt": ({}, "50%, OBS update"),
    "prune.wanda": ({"pattern": "2:4"}, "2:4 by |W| x ||X||"),
    "prune.random": ({}, "sparsity 0.5"),
    "prune.snip": ({}, "sparsity 0.5"),
    "prune.soft_filter": ({}, "30% of filters zeroed"),
    "prune.taylor": ({}, "sparsity 0.5"),
    "quant.adaround": ({"iterations": 20}, "int4 weights, 20 iters"),
    "quant.dynamic_int8": ({}, "int8 dynamic"),
    "quant.kmeans": ({"iters": 10}, "5-bit shared (conv 8)"),
    "quant.log2": ({}, "5-bit powers of two"),
    "quant.mixed_precision": ({"budget_ratio": 0.25}, "1/4 of fp32 bytes"),
    "quant.qat": ({}, "W4A8 QAT"),
    "quant.static_int8": ({}, "W8A8 static"),
    "quant.weight_only": ({}, "int8 weights"),
    "quant.gptq": ({"group_size": 32}, "GPTQ int4, groups of 32"),
    "quant.awq": ({"group_size": 32}, "AWQ int4, groups of 32"),
    "quant.smoothquant": ({}, "SmoothQuant alpha 0.5 + W8A8 static"),
    "lowrank.svd": ({}, "SVD, default rank"),
    "lowrank.tucker": ({"n_iter_max": 10}, "Tucker, default rank"),
    "lowrank.cp": ({"n_iter_max": 10}, "CP, default rank"),
    "distill.kd": ({}, "KD from the model itself"),
    "distill.mutual": ({}, "mutual, fresh peer"),
    "distill.qat": ({}, "W4A8 QAT + KD"),
    "distill.self": ({}, "3 exits"),
    "distill.shallow": ({"keep": 0.5}, "half the blocks, chosen by fidelity"),
}
BASELINE = "baseline"  # the uncompressed model through the same measurements
PEER = "peer.torch_pruning"  # Torch-Pruning on the prune.channels rows
TP_RATIO = 0.3


def method_config(name: str):
    """The config of :data:`METHOD_CONFIGS` for the registered method ``name``."""
    info = next(i for i in list_methods(name) if i.name == name)
    return info, info.config_cls(**METHOD_CONFIGS.get(name, ({}, ""))[0])


# -- the models --------------------------------------------------------------------------------------
TIMM_MODELS = (
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_small_patch32_224",
    "vit_base_patch32_224", "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224",
    "deit3_small_patch16_224", "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
    "swinv2_tiny_window8_256", "convnext_atto", "convnext_femto", "convnext_nano", "convnext_tiny",
    "convnextv2_atto", "efficientnet_b0", "efficientnet_b2", "efficientnet_lite0", "tf_efficientnet_b0",
    "efficientnetv2_rw_t", "regnetx_002", "regnetx_016", "regnety_002", "regnety_016", "regnetz_b16",
    "mobilenetv3_small_050", "mobilenetv3_small_100", "mobilenetv3_large_100", "tf_mobilenetv3_large_minimal_100",
    "resnet18", "resnet26d", "resnet50", "resnet50d", "resnetv2_50", "resnext50_32x4d", "seresnext26d_32x4d",
    "ecaresnet26t", "skresnet18", "wide_resnet50_2",
)
QUICK = {
    "torchvision": ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "swin_t"),
    "timm": ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "convnext_atto", "efficientnet_b0",
             "mobilenetv3_small_100", "resnet26d"),
    "hf": ("bert", "bert-encoder", "vit", "gpt2", "llama", "qwen2"),
    "nn": ("transformer", "transformer-prenorm", "lstm", "gru"),
}

# family -> (config class, architecture, kind, realistic size, tiny size for CI). Kinds: "text"
# (sequence classifier: input_ids/attention_mask, a label per sequence), "lm" (causal LM logits,
# next-token labels), "embed" (headless encoder: a SentenceEncoder, no labels), "image".
VOCAB = 8192  # real vocabularies are 30-150k: as wide, only shorter (the embedding and LM head dominate otherwise)
_BERT = {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072, "num_hidden_layers": 2,
         "vocab_size": VOCAB}
_TINY_ENC = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 2,
             "vocab_size": 128, "max_position_embeddings": 64}
_TINY_LM = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 64}
HF_FAMILIES: dict[str, tuple[str, str, str, dict, dict]] = {
    "bert": ("BertConfig", "BertForSequenceClassification", "text", {**_BERT, "num_labels": 2},
             {**_TINY_ENC, "num_labels": 2}),
    "bert-encoder": ("BertConfig", "BertModel", "embed",  # MiniLM-like widths: 384 wide, 12 heads
                     {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536,
                      "num_hidden_layers": 2, "vocab_size": VOCAB}, _TINY_ENC),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", "text",
                   {"dim": 768, "n_heads": 12, "hidden_dim": 3072, "n_layers": 2, "num_labels": 2, "vocab_size": VOCAB},
                   {"dim": 32, "n_heads": 4, "hidden_dim": 64, "n_layers": 2, "vocab_size": 128,
                    "max_position_embeddings": 64, "num_labels": 2}),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", "text", {**_BERT, "num_labels": 2},
                {**_TINY_ENC, "num_labels": 2}),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", "text",
               {**_BERT, "embedding_size": 128, "num_labels": 2},
               {**_TINY_ENC, "embedding_size": 16, "num_labels": 2}),
    "vit": ("ViTConfig", "ViTForImageClassification", "image",
            {**_BERT, "image_size": 224, "patch_size": 16, "num_labels": 10},
            {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 2,
             "image_size": 32, "patch_size": 8, "num_labels": 10}),
    "swin": ("SwinConfig", "SwinForImageClassification", "image",  # Swin-T widths, one block per stage
             {"image_size": 224, "embed_dim": 96, "depths": [1, 1, 2, 1], "num_heads": [3, 6, 12, 24],
              "window_size": 7, "num_labels": 10},
             {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4],
              "window_size": 4, "num_labels": 10}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "lm", {"n_embd": 768, "n_head": 12, "n_layer": 2, "vocab_size": VOCAB,
                                                        "bos_token_id": VOCAB - 1, "eos_token_id": VOCAB - 1},
             {"n_embd": 32, "n_head": 4, "n_layer": 2, "vocab_size": 256, "n_positions": 64}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "lm",  # GQA: 16 query heads share 4 key/value heads
              {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4,
               "intermediate_size": 2816, "num_hidden_layers": 2, "vocab_size": VOCAB}, _TINY_LM),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "lm",  # Qwen2-0.5B widths: 14 heads, 2 KV heads, tied
              {"hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
               "num_hidden_layers": 2, "vocab_size": VOCAB, "tie_word_embeddings": True}, _TINY_LM),
    "mistral": ("MistralConfig", "MistralForCausalLM", "lm",  # 32 heads, 8 KV heads, sliding window
                {"hidden_size": 1024, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "intermediate_size": 3584, "num_hidden_layers": 2, "vocab_size": VOCAB, "sliding_window": 4096},
                _TINY_LM),
    "phi": ("PhiConfig", "PhiForCausalLM", "lm",  # Phi-2 heads (80 wide, 40% rotary), parallel attention + MLP
            {"hidden_size": 1280, "num_attention_heads": 16, "intermediate_size": 5120, "num_hidden_layers": 2,
             "vocab_size": VOCAB, "partial_rotary_factor": 0.4},
            {**{k: v for k, v in _TINY_LM.items() if k != "num_key_value_heads"}, "partial_rotary_factor": 0.5}),
}
SEQ_LEN = 16
BATCH = 4
N_BATCHES = 4
NUM_CLASSES = 10


class TransformerClassifier(nn.Module):
    """Token ids -> ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` -> mean over tokens -> classes."""

    def __init__(self, vocab: int = 1000, dim: int = 256, layers: int = 2, heads: int = 8,
                 classes: int = NUM_CLASSES, norm_first: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=norm_first,
                                           activation="gelu" if norm_first else "relu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class RNNClassifier(nn.Module):
    """Token ids -> ``nn.LSTM`` / ``nn.GRU`` (GRU bidirectional) -> last position -> classes."""

    def __init__(self, cell: str = "lstm", vocab: int = 1000, dim: int = 256, layers: int = 2,
                 classes: int = NUM_CLASSES):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        bidirectional = cell == "gru"
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(dim, dim, layers, batch_first=True,
                                                           bidirectional=bidirectional)
        self.head = nn.Linear(dim * (2 if bidirectional else 1), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


# zero-argument factories, so load_model("benchmarks/coverage.py:NAME") records them for reloading
def nn_transformer():
    return TransformerClassifier()


def nn_transformer_prenorm():
    return TransformerClassifier(norm_first=True)


def nn_lstm():
    return RNNClassifier("lstm")


def nn_gru():
    return RNNClassifier("gru")


def nn_transformer_tiny():
    return TransformerClassifier(vocab=64, dim=32, heads=4)


def nn_transformer_prenorm_tiny():
    return TransformerClassifier(vocab=64, dim=32, heads=4, norm_first=True)


def nn_lstm_tiny():
    return RNNClassifier("lstm", vocab=64, dim=32)


def nn_gru_tiny():
    return RNNClassifier("gru", vocab=64, dim=32)


@dataclass(frozen=True)
class ModelSpec:
    """One model of the matrix. ``ref``: a ``load_model`` reference (``torchvision:``, ``timm:``,
    ``FILE.py:factory``) or, for ``hf``, the family key of :data:`HF_FAMILIES`."""

    name: str  # row label, e.g. "torchvision:resnet18", "hf:llama", "nn:lstm"
    family: str
    ref: str
    kind: str = "image"  # image | text | lm | embed | tokens
    tiny: bool = False
    image_size: int | None = None  # None: the run's --image-size
    params: int | None = None  # counted on the meta device by catalog(); None: not counted


def torchvision_ref(name: str, tiny: bool = False) -> str:
    return f"torchvision:{name}?num_classes={NUM_CLASSES}"


def timm_ref(name: str, tiny: bool = False) -> str:
    return f"timm:{name}?num_classes={NUM_CLASSES}"


def hf_specs(tiny: bool = False) -> list[ModelSpec]:
    return [ModelSpec(f"hf:{key}", "hf", key, kind=entry[2], tiny=tiny) for key, entry in HF_FAMILIES.items()]


def nn_specs(tiny: bool = False) -> list[ModelSpec]:
    suffix = "_tiny" if tiny else ""
    return [ModelSpec(f"nn:{key}", "nn", f"{HERE}:nn_{key.replace('-', '_')}{suffix}", kind="tokens", tiny=tiny)
            for key in ("transformer", "transformer-prenorm", "lstm", "gru")]


@contextlib.contextmanager
def params_on_meta():
    """Build modules with their parameters on the meta device (no memory, no init time), while
    the constructor's other tensor code still runs on the CPU (torchvision's RegNet computes its
    widths with tensors, which the meta device refuses)."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def count_params_meta(spec: ModelSpec, workdir: Path) -> int | None:
    """Parameters of ``spec`` without allocating them (None when the model cannot be built so)."""
    try:
        with params_on_meta(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(spec, workdir)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - counting is an optimisation; the run itself reports failures
        return None


def catalog(families=FAMILIES, *, quick: bool = False, workdir: Path | None = None,
            max_params: float | None = None, models: str = "*") -> list[ModelSpec]:
    """The models of the matrix, filtered by ``models`` (globs on the row label, comma-separated)
    and ``max_params``."""
    prepare_torchvision()
    specs: list[ModelSpec] = []
    if "torchvision" in families:
        import torchvision

        names = sorted(torchvision.models.list_models(module=torchvision.models))
        specs += [ModelSpec(f"torchvision:{n}", "torchvision", torchvision_ref(n)) for n in names
                  if not quick or n in QUICK["torchvision"]]
    if "timm" in families:
        specs += [ModelSpec(f"timm:{n}", "timm", timm_ref(n)) for n in TIMM_MODELS
                  if not quick or n in QUICK["timm"]]
    if "hf" in families:
        specs += [s for s in hf_specs() if not quick or s.ref in QUICK["hf"]]
    if "nn" in families:
        specs += [s for s in nn_specs() if not quick or s.name.split(":")[1] in QUICK["nn"]]
    globs = [g.strip() for g in models.split(",") if g.strip()]
    specs = [s for s in specs if any(fnmatch.fnmatchcase(s.name, g) for g in globs)]
    workdir = workdir or Path(tempfile.mkdtemp(prefix="coverage-"))
    counted = [ModelSpec(**{**asdict(s), "params": count_params_meta(s, workdir)}) for s in specs]
    return [s for s in counted if max_params is None or s.params is None or s.params <= max_params]


# Small variants of each family for CI (tests/test_coverage.py): tiny configs, 32 px images.
TINY_VISION = (
    ("torchvision:resnet18", "torchvision:resnet18?num_classes=10"),
    ("torchvision:mobilenet_v3_small", "torchvision:mobilenet_v3_small?num_classes=10"),
    ("timm:vit_tiny_patch16_224", "timm:vit_tiny_patch16_224?num_classes=10&img_size=32&patch_size=8&depth=2"),
    ("timm:convnext_atto", "timm:convnext_atto?num_classes=10"),
    ("timm:efficientnet_b0", "timm:efficientnet_b0?num_classes=10"),
)


def tiny_catalog() -> list[ModelSpec]:
    """Tiny variants of every family: 32 px vision models, 2-layer HF configs 32-64 wide, tiny nn models."""
    vision = [ModelSpec(name, name.split(":")[0], ref, tiny=True, image_size=32) for name, ref in TINY_VISION]
    return vision + hf_specs(tiny=True) + nn_specs(tiny=True)


def hf_dir(spec: ModelSpec, workdir: Path) -> Path:
    """A local Hugging Face folder holding only the family's config.json (written once; the name
    carries a hash of the config, so an edited config gets a new folder)."""
    cfg_name, arch, _, full, tiny = HF_FAMILIES[spec.ref]
    values = {**(tiny if spec.tiny else full), "architectures": [arch]}
    digest = hashlib.sha1(json.dumps([cfg_name, values], sort_keys=True).encode()).hexdigest()[:8]
    path = workdir / "hf" / f"{spec.ref}{'-tiny' if spec.tiny else ''}-{digest}"
    if not (path / "config.json").is_file():
        transformers = import_transformers()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".partial-"))
        getattr(transformers, cfg_name)(**values).save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # written meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_model(spec: ModelSpec, workdir: Path) -> nn.Module:
    """The (randomly initialised) model of ``spec``, through the product's ``load_model``."""
    if spec.family == "hf":
        return load_model(f"hf:{hf_dir(spec, workdir)}")
    return load_model(spec.ref)


def native_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}  # timm
    if "input_size" in cfg:
        return int(cfg["input_size"][-1])
    hf_cfg = getattr(getattr(model, "hf", None), "config", None)
    if hf_cfg is not None and hasattr(hf_cfg, "image_size"):
        return int(hf_cfg.image_size)
    return 299 if type(model).__name__ == "Inception3" else 224


def runs_at(model: nn.Module, x: Any) -> bool:
    try:
        with torch.no_grad():
            call_model(model.eval(), x)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not at this size"
        return False


def make_batches(spec: ModelSpec, model: nn.Module, image_size: int, seed: int = 0) -> list:
    """``N_BATCHES`` random batches the model accepts (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "image":
        sizes = [spec.image_size] if spec.image_size else [image_size, native_size(model)]
        # on copies: a failed call may change the model (HF Swin shrinks its windows for good)
        size = next((s for s in sizes if runs_at(copy.deepcopy(model), torch.randn(2, 3, s, s, generator=g))),
                    sizes[-1])
        return [(torch.randn(BATCH, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g))
                for _ in range(N_BATCHES)]
    if spec.kind == "tokens":
        vocab = model.embed.num_embeddings
        return [(torch.randint(0, vocab, (BATCH, SEQ_LEN), generator=g),
                 torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)) for _ in range(N_BATCHES)]
    hf = model.hf if hasattr(model, "hf") else model.backbone
    vocab = hf.config.vocab_size
    out = []
    for _ in range(N_BATCHES):
        ids = torch.randint(0, vocab, (BATCH, SEQ_LEN), generator=g)
        mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
        if spec.kind != "lm":
            mask[0, -3:] = 0  # one padded sentence: masks must be honoured
        batch = {"input_ids": ids, "attention_mask": mask}
        if spec.kind == "text":
            batch["labels"] = torch.randint(0, hf.config.num_labels, (BATCH,), generator=g)
        elif spec.kind == "lm":
            batch["labels"] = torch.roll(ids, -1, dims=1)  # next token at every position
        out.append(batch)
    return out


def example_of(batches: list, n: int) -> Any:
    """The inputs (no labels) of the first ``n`` samples of the first batch."""
    first = batches[0]
    inputs = {k: v for k, v in first.items() if k != "labels"} if isinstance(first, dict) else first[0]
    return slice_inputs(inputs, n)


def task_of(spec: ModelSpec):
    return SentenceEmbedding(graded=False) if spec.kind == "embed" else Classification()


def method_inputs(spec: ModelSpec, info, batches: list, model: nn.Module) -> MethodInputs:
    """Data for every method, training only for those that train, the model itself as teacher."""
    train = TrainConfig(epochs=1, max_steps=2, batch_size=BATCH, lr=1e-4) if info.needs_training else None
    teachers = (copy.deepcopy(model),) if info.family == "distill" else ()
    return MethodInputs(data=batches, train=train, teachers=teachers, task=task_of(spec))


# -- one (method, model) -----------------------------------------------------------------------------
def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    return first_tensor(out[0])


def exception_record(exc: BaseException, stage: str) -> dict:
    """Type, first line, the deepest frame inside ``src/modelpress`` and the deepest frame of all."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/modelpress/" in f.filename and "site-packages" not in f.filename
            and not f.filename.endswith(HERE.name)]
    short = lambda f: f"{f.filename.split('/src/')[-1].split('site-packages/')[-1]}:{f.lineno} ({f.name})"  # noqa: E731
    lines = str(exc).strip().splitlines()
    first = re.sub(r"/tmp/\S*?(\.onnx|\.safetensors)\b", r"FILE\1", lines[0] if lines else "")
    return {"stage": stage, "type": type(exc).__name__, "message": first[:300],
            "hint": getattr(exc, "hint", None), "where": short(ours[-1]) if ours else None,
            "origin": short(frames[-1]) if frames else None}


class ShapeChanged(Exception):
    """The compressed model's output shape differs from the original's."""


def classify(exc: BaseException) -> str:
    if isinstance(exc, ShapeChanged):
        return "wrong"
    if isinstance(exc, SKIP_ERRORS):
        return "skipped"
    return "error" if isinstance(exc, ModelpressError) else "raw"


def check(stage: str, fn, row: dict, send) -> Any:
    """Run a measurement; a failure becomes ``no`` (a ModelpressError or a changed output
    shape) or ``raw`` in the row's ``stage`` column, with the exception in ``problems``."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the matrix records every kind
        kind = classify(exc)
        row.setdefault("problems", []).append({**exception_record(exc, stage), "status": kind})
        row[stage] = "raw" if kind == "raw" else "no"
        send({stage: row[stage], "problems": row["problems"]})
        return None


def run_the_method(spec: ModelSpec, method: str, model: nn.Module, batches: list, row: dict) -> nn.Module | None:
    """``run_method`` with the config of :data:`METHOD_CONFIGS`; on failure the row gets the
    status and the exception, and None is returned."""
    row["requested"] = METHOD_CONFIGS.get(method, ({}, "defaults"))[1]
    t0 = time.perf_counter()
    try:
        info, cfg = method_config(method)
        out_model, report = run_method(model, cfg, method_inputs(spec, info, batches, model), seed=0)
    except Exception as exc:  # noqa: BLE001 - the matrix records every kind
        row.update(status=classify(exc), seconds=round(time.perf_counter() - t0, 2), **exception_record(exc, "method"))
        return None
    row.update(status="ok", seconds=round(time.perf_counter() - t0, 2))
    if report.unsupported_layers:
        kinds = sorted(set(report.unsupported_layers.values()))
        row["note"] = f"left {len(report.unsupported_layers)} layers as they are ({', '.join(kinds[:3])})"
    return out_model


def probe(spec: ModelSpec, method: str, *, workdir: Path, image_size: int = 64, onnx: bool = True,
          send=lambda update: None) -> dict:
    """Run ``method`` (or :data:`BASELINE`, :data:`PEER`) on ``spec``'s model and measure the
    result; ``send`` receives the row as it fills (so a run cut short keeps what it found)."""
    row: dict[str, Any] = {"model": spec.name, "family": spec.family, "method": method}
    t0 = time.perf_counter()
    model = build_model(spec, workdir).eval()
    batches = make_batches(spec, model, image_size)
    example = example_of(batches, 2)
    with torch.no_grad():
        ref_out = first_tensor(call_model(model, example))
    row.update(params_before=n_params(model), nonzero_before=n_nonzero(model), input=_describe(example))
    send(dict(row))
    if method == PEER:
        return {**row, **torch_pruning_row(model, example, ref_out)}
    if method == BASELINE:
        out_model = model
        row.update(status="ok", seconds=0.0)
    else:
        out_model = run_the_method(spec, method, model, batches, row)
    send(dict(row))
    if out_model is None:
        return row

    def runs():
        with torch.no_grad():
            out = first_tensor(call_model(out_model, example))
        if out.shape != ref_out.shape:
            raise ShapeChanged(f"output shape {tuple(out.shape)}, was {tuple(ref_out.shape)}")
        return out

    out = check("forward", runs, row, send)
    row.update(params_after=n_params(out_model), nonzero_after=n_nonzero(out_model))
    if out is not None:
        row["forward"] = "yes"
        macs0 = check("macs", lambda: count_macs(model, slice_inputs(example, 1)).total, row, send)
        macs1 = check("macs", lambda: count_macs(out_model, slice_inputs(example, 1)).total, row, send)
        if macs0 and macs1 is not None:
            row["macs_kept"] = macs1 / macs0
    send(dict(row))
    with tempfile.TemporaryDirectory() as tmp:
        row["bytes_before"] = check("size", lambda: save_artifact(model, Path(tmp) / "original.safetensors")
                                    .stat().st_size, row, send)
        if out is not None:
            def reload():
                path = save_artifact(out_model, Path(tmp) / "model.safetensors")
                row["bytes_after"] = path.stat().st_size
                back, _ = load_artifact(path, trust_remote_code=spec.family == "nn")  # nn: this file's factories
                with torch.no_grad():
                    again = first_tensor(call_model(back, example))
                tol = 1e-5 * max(1.0, float(out.abs().max()))
                return "yes" if torch.allclose(again, out, rtol=1e-4, atol=tol) \
                    else f"no (max diff {float((again - out).abs().max()):.2e})"

            row["reload"] = check("reload", reload, row, send) or row.get("reload")
            send(dict(row))
            if onnx:
                def export():
                    export_deployable(out_model, example, Path(tmp) / "model.onnx", check=True)
                    return "yes"

                row["onnx"] = check("onnx", export, row, send) or row.get("onnx")
    row["total_seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _describe(example: Any) -> str:
    if isinstance(example, dict):
        return "x".join(map(str, next(iter(example.values())).shape[1:])) + " tokens"
    return "x".join(map(str, example.shape[1:]))


# -- the peer: Torch-Pruning ----------------------------------------------------------------------------
def output_layers(model: nn.Module, ref_out: torch.Tensor) -> list[nn.Module]:
    """Linear / conv layers whose output width is the model's output width (the classifier or LM
    head): Torch-Pruning must not prune them, modelpress never does."""
    width = ref_out.shape[-1]
    return [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == width)
            or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == width)]


def torch_pruning_row(model: nn.Module, example: Any, ref_out: torch.Tensor) -> dict:
    """Torch-Pruning's MetaPruner (L1 magnitude, ratio 0.3) on a copy: kept parameter fraction."""
    t0 = time.perf_counter()
    try:
        import torch_pruning as tp
    except ImportError:
        return {"status": "skipped", "message": "torch-pruning is not installed (pip install -c constraints.txt "
                                                "torch-pruning)"}
    try:
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=TP_RATIO, ignored_layers=output_layers(m, ref_out))
        pruner.step()
        with torch.no_grad():
            out = first_tensor(call_model(m.eval(), example))
        if out.shape != ref_out.shape:
            raise RuntimeError(f"output shape {tuple(out.shape)} != {tuple(ref_out.shape)}")
        return {"status": "ok", "params_after": n_params(m), "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as exc:  # noqa: BLE001 - a peer's failure is data, not our bug
        return {"status": "error", "seconds": round(time.perf_counter() - t0, 2), **exception_record(exc, "peer")}


# -- running the matrix: one process per pair ----------------------------------------------------------
def _child(conn, spec: ModelSpec, method: str, options: dict, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(options.pop("threads"))
    try:
        row = probe(spec, method, send=conn.send, **options)
    except Exception as exc:  # noqa: BLE001 - building the model or its data failed: not a method's fault
        traceback.print_exc()
        row = {"status": "error" if isinstance(exc, ModelpressError) else "raw", **exception_record(exc, "model")}
    if row.get("status") == "raw" or any(p["status"] == "raw" for p in row.get("problems", [])):
        print(json.dumps(row, indent=1, default=str))
    conn.send({**row, "done": True})
    conn.close()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def run_isolated(ctx, spec: ModelSpec, method: str, options: dict, timeout: float, log: Path,
                 max_rss: float = 8e9) -> dict:
    """``probe`` in a fresh process, killed after ``timeout`` seconds (status ``timeout``) or above
    ``max_rss`` bytes of memory (``oom``); a measurement stage cut short is marked so instead
    when the method itself finished."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, spec, method, dict(options), str(log)), daemon=True)
    t0 = time.monotonic()
    proc.start()
    send.close()
    row: dict[str, Any] = {"model": spec.name, "family": spec.family, "method": method}
    cut = None
    while cut is None:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            cut = "timeout"
        elif rss_bytes(proc.pid) > max_rss:
            cut = "oom"
        elif recv.poll(min(left, 1.0)):
            try:
                msg = recv.recv()
            except EOFError:  # the process died without a word (segfault, killed by the kernel)
                proc.join(5)
                row.update(status="raw", type="ProcessDied", message=f"exit code {proc.exitcode}", stage="process")
                break
            row.update(msg)
            if msg.get("done"):
                break
    if cut is not None:
        proc.kill()
        row["limit"] = f"{cut} ({timeout:.0f} s)" if cut == "timeout" else f"{cut} (> {max_rss / 1e9:.0f} GB)"
        if row.get("status") == "ok":  # the method finished; a measurement was cut short
            row[next((s for s in ("forward", "reload", "onnx") if s not in row), "onnx")] = cut
        else:
            row["status"] = cut
    row.pop("done", None)
    proc.join(5)
    row["wall_seconds"] = round(time.monotonic() - t0, 1)
    return row


def load_results(path: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                rows[(r["method"], r["model"])] = r
    return rows


def methods_for(pattern: str) -> list[str]:
    names = [BASELINE] + [i.name for i in list_methods()]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pattern.split(","))]


# -- the table ---------------------------------------------------------------------------------------
def _frac(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _clip(text: Any, n: int = 110) -> str:
    text = str(text or "").replace("|", "/").replace("\n", " ")
    return text if len(text) <= n else text[:n - 3] + "..."


def _note(r: dict) -> str:
    st = r.get("status")
    parts = [f"{r.get('type')}: {r.get('message')}" if st == "raw" else
             r.get("message") if st in ("error", "skipped") else r.get("note")]
    parts += [f"{p['stage']}: {p['type']}: {p['message']}" for p in r.get("problems", [])]
    parts.append(r.get("limit"))
    return "; ".join(str(p) for p in parts if p)


def table(rows: list[dict], peers: dict[str, dict]) -> list[str]:
    head = ["family", "model", "method", "status", "requested", "params", "nonzero", "MACs", "size", "runs",
            "reload", "onnx", "method s", "total s", "TP params", "note"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        st = r.get("status", "?")
        ok = st == "ok"
        tp = "-"
        if r["method"] == "prune.channels" and r["model"] in peers:
            p = peers[r["model"]]
            tp = _frac(p.get("params_after"), p.get("params_before")) if p.get("status") == "ok" \
                else f"{p.get('status')}: {_clip(p.get('type') or p.get('limit'), 30)}"
        cols = [r["family"], r["model"], r["method"], st, r.get("requested", "-")]
        if ok:
            cols += [_frac(r.get("params_after"), r.get("params_before")),
                     _frac(r.get("nonzero_after"), r.get("nonzero_before")),
                     f"{r['macs_kept']:.2f}" if r.get("macs_kept") is not None else "-",
                     _frac(r.get("bytes_after"), r.get("bytes_before")),
                     r.get("forward", "-"), _clip(r.get("reload", "-"), 30), r.get("onnx", "-")]
        else:
            cols += ["-"] * 7
        seconds = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        cols += [seconds, f"{r.get('wall_seconds', r.get('total_seconds', 0)):.0f}", tp, _clip(_note(r))]
        out.append("| " + " | ".join(cols) + " |")
    return out


def summary(rows: list[dict], peers: dict[str, dict]) -> list[str]:
    """Counts per family and status; for the ``ok`` runs, how many compressed models ran with
    the original output shape, reloaded identically and passed ONNX Runtime (yes/no/raw)."""
    lines = ["| family | models | runs | " + " | ".join(STATUSES)
             + " | ok: runs yes/no/raw | ok: reload yes/no/raw | ok: onnx yes/no/raw |",
             "|---|---|---|" + "---|" * (len(STATUSES) + 3)]
    for fam in [f for f in FAMILIES if any(r["family"] == f for r in rows)] + ["all"]:
        rs = [r for r in rows if fam == "all" or r["family"] == fam]
        counts = [sum(r.get("status") == s for r in rs) for s in STATUSES]
        ok = [r for r in rs if r.get("status") == "ok"]

        def tally(col):
            return "/".join(str(sum(str(r.get(col, "")).startswith(v) for r in ok)) for v in ("yes", "no", "raw"))

        lines.append(f"| {fam} | {len({r['model'] for r in rs})} | {len(rs)} | " + " | ".join(map(str, counts))
                     + f" | {tally('forward')} | {tally('reload')} | {tally('onnx')} |")
    raws = raw_exceptions(rows)
    lines += ["", f"Raw exceptions: {len(raws)} ({sum(r['stage'] == 'method' for r in raws)} escaping a method, "
                  f"{sum(r['stage'] != 'method' for r in raws)} from running / reloading / exporting its result)."]
    if peers:
        tp_ok = sum(p.get("status") == "ok" for p in peers.values())
        lines.append(f"Torch-Pruning MetaPruner (L1, ratio {TP_RATIO}): {tp_ok} of {len(peers)} models pruned "
                     "with the output shape kept (column TP params on the prune.channels rows).")
    return lines


def raw_exceptions(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r.get("status") == "raw":
            out.append({"method": r["method"], "model": r["model"], "stage": r.get("stage", "method"),
                        "type": r.get("type"), "message": r.get("message"), "where": r.get("where"),
                        "origin": r.get("origin")})
        for p in r.get("problems", []):
            if p["status"] == "raw":
                out.append({"method": r["method"], "model": r["model"], **{k: p.get(k) for k in
                            ("stage", "type", "message", "where", "origin")}})
    return out


def raw_list(rows: list[dict]) -> list[str]:
    raws = raw_exceptions(rows)
    if not raws:
        return []
    lines = ["| method | model | stage | exception | first line | raised in src | deepest frame |",
             "|---|---|---|---|---|---|---|"]
    for r in raws:
        lines.append(f"| {r['method']} | {r['model']} | {r['stage']} | {r['type']} | {_clip(r['message'], 120)} | "
                     f"{r['where'] or '-'} | {r['origin'] or '-'} |")
    return lines


def report(rows: list[dict], command: str) -> str:
    peers = {r["model"]: r for r in rows if r["method"] == PEER}
    rows = [r for r in rows if r["method"] != PEER]
    parts = [f"Printed by `{command}`", "", "## Summary", "", *summary(rows, peers), ""]
    if raw_exceptions(rows):
        parts += ["## Raw exceptions", "", *raw_list(rows), ""]
    parts += ["## Matrix", "", *table(rows, peers), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    p.add_argument("--methods", default="*", help="globs on method names, comma-separated ('baseline' included)")
    p.add_argument("--models", default="*", help="globs on row labels, comma-separated, e.g. 'timm:vit*,hf:*'")
    p.add_argument("--max-params", type=float, default=150e6, help="skip larger models (default 150e6)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per (method, model) (default 600)")
    p.add_argument("--max-rss", type=float, default=8, help="GB of memory per run before it is killed (default 8)")
    p.add_argument("--image-size", type=int, default=64, help="image side where the model runs at it (else native)")
    p.add_argument("--quick", action="store_true", help="a handful of models per family")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export check")
    p.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--results", type=Path, default=Path("runs/coverage/results.jsonl"),
                   help="one JSON line per finished pair; pairs found there are not run again")
    p.add_argument("--redo", default="", help="statuses to run again although in --results, e.g. raw,timeout")
    p.add_argument("--markdown", type=Path, help="write the summary and the table to this file")
    p.add_argument("--list", action="store_true", help="print the models (with parameter counts) and exit")
    p.add_argument("--report", default="", help="comma-separated result files: print (and --markdown) the table "
                                                "of every row in them, run nothing (runs split across processes)")
    args = p.parse_args(argv)
    command = "python benchmarks/coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report:
        done = {}
        for f in filter(None, args.report.split(",")):
            done.update(load_results(Path(f)))
        rows = [done[k] for k in sorted(done, key=lambda k: (FAMILIES.index(done[k]["family"]), k[1], k[0]))]
        return _write_report(rows, command.strip(), args.markdown)

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    workdir = args.results.parent
    workdir.mkdir(parents=True, exist_ok=True)
    specs = catalog(families, quick=args.quick, workdir=workdir, max_params=args.max_params, models=args.models)
    if args.list:
        for s in specs:
            print(f"{s.family:12s} {s.name:45s} {s.params / 1e6 if s.params else float('nan'):8.1f} M")
        print(f"{len(specs)} models")
        return 0
    methods = methods_for(args.methods)
    if not methods or not specs:
        p.error("no method or no model matches")
    jobs = [(m, s) for s in specs for m in methods]
    if not args.no_peer and "prune.channels" in methods:
        jobs += [(PEER, s) for s in specs]
    done = load_results(args.results)
    redo = set(filter(None, args.redo.split(",")))
    todo = [(m, s) for m, s in jobs if (m, s.name) not in done or done[(m, s.name)].get("status") in redo]
    print(f"{len(specs)} models x {len(methods)} methods: {len(jobs)} runs, {len(jobs) - len(todo)} in "
          f"{args.results}, {len(todo)} to run (timeout {args.timeout:.0f} s each)", flush=True)

    # Each run is a process forked from this one after preload(): it starts at once, with torch,
    # modelpress and the model libraries imported, and leaves nothing behind when it ends. (This
    # process runs no torch threads: OMP_NUM_THREADS=1 is set above before torch starts.)
    preload()
    ctx = mp.get_context("fork")
    options = {"workdir": workdir.resolve(), "image_size": args.image_size, "onnx": not args.no_onnx,
               "threads": args.threads}
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    for i, (method, spec) in enumerate(todo, 1):
        log = logs / f"{method}__{spec.name.replace(':', '_').replace('/', '_')}.log"
        row = run_isolated(ctx, spec, method, options, args.timeout, log, args.max_rss * 1e9)
        done[(method, spec.name)] = row
        with args.results.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        if row.get("status") != "ok":
            extra = f"{row.get('type')}: {row.get('message')}" if row.get("type") else row.get("limit", "")
        else:
            extra = f"params {_frac(row.get('params_after'), row.get('params_before'))}" + (
                "" if method == PEER else f" runs {row.get('forward', '-')} reload {row.get('reload', '-')} "
                                          f"onnx {row.get('onnx', '-')}")
        print(f"[{i}/{len(todo)}] {spec.name} {method}: {row.get('status')} {row['wall_seconds']:.0f}s "
              f"{_clip(extra, 100)}", flush=True)

    keep = {(m, s.name) for m, s in jobs}
    rows = [done[k] for k in sorted(done, key=lambda k: (FAMILIES.index(done[k]["family"]), k[1], k[0]))
            if k in keep]
    return _write_report(rows, command.strip(), args.markdown)


def _write_report(rows: list[dict], command: str, markdown: Path | None) -> int:
    text = report(rows, command)
    print(text)
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(f"# Coverage matrix: every method x real architectures\n\n{text}")
    return 0


def preload() -> None:
    """Import what every run needs (the method modules, the model libraries, the Hugging Face
    model classes), so that processes forked after it start at once. Not ONNX Runtime: importing
    it starts a thread, which a forked process would lack."""
    list_methods()
    prepare_torchvision()
    for name in ("timm", "torchvision", "torch_pruning"):
        with contextlib.suppress(ImportError):
            __import__(name)
    with contextlib.suppress(ModelpressError):
        transformers = import_transformers()
        for _, arch, *_ in HF_FAMILIES.values():
            getattr(transformers, arch, None)


if __name__ == "__main__":
    sys.exit(main())
