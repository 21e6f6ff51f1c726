"""A Hugging Face folder in the compressed-tensors format (what vLLM and transformers load).

A compressed Hugging Face model (:class:`~modelpress.artifact.hf.HFLogits` or
:class:`~modelpress.artifact.hf.SentenceEncoder`) is written as ``config.json`` with a
``quantization_config``, ``model.safetensors`` and the tokenizer files of the folder it came from:

* weight-only packed Linear layers (``quant.weight_only``, ``quant.gptq``, ``quant.awq``, whose scales
  went into the float norms / Linear layers in front; 2..8 bits, one scale per
  tensor, output channel or group, symmetric or asymmetric) in the ``pack-quantized`` format, int8
  too (what compressed-tensors itself picks for weight-only integer layers): ``weight_packed``
  (int32, ``32 / bits`` values per word along the inputs), ``weight_scale`` (one per group / channel),
  ``weight_zero_point`` (asymmetric only, packed along the outputs) and ``weight_shape``;
* float Linear layers of a quantized model are named in ``ignore`` (an ``lm_head`` left in float);
* 2:4 sparse Linear layers (``prune.nm``, ``prune.wanda``, ``prune.sparsegpt`` with ``2:4``), alone or
  quantized as well, keep their zeros; ``sparsity_config`` records the structure
  (``sparsity_structure: "2:4"``, format ``dense``: the zeros are stored, not compressed away;
  compressed-tensors 0.15 and later no longer ship sparse compressors, loaders ignore the block).

The tensors are made by compressed-tensors' own code: every packed layer becomes an ``nn.Linear``
holding its dequantized weight with our scales and zero points attached under the names
compressed-tensors uses, compressed-tensors' ``pack-quantized`` compressor re-derives and packs the
integers (checked equal to ours, bit for bit), ``save_pretrained`` writes the weights and
``ModelCompressor.update_config`` the ``quantization_config``; what llm-compressor does when it saves.

Example (a tiny random Llama; ``modelpress export --format compressed-tensors`` does the same)::

    import torch, transformers
    from modelpress import quantize
    from modelpress.artifact.hf import HFLogits
    from modelpress.quantization.weight_only import WeightOnly
    from modelpress.export.compressed_tensors import export_compressed_tensors
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    q = quantize(HFLogits(transformers.LlamaForCausalLM(config)),
                 WeightOnly(bits=4, granularity="group", group_size=128))
    ids = torch.randint(0, 512, (1, 16))
    print(export_compressed_tensors(q, "llama-w4g128", check_inputs=ids).note)
    back = transformers.AutoModelForCausalLM.from_pretrained("llama-w4g128")  # decompresses on CPU
    assert torch.equal(back(input_ids=ids).logits, q(ids))

Loading back (measured with transformers 5.23, compressed-tensors 0.19.0 and 0.20.1): symmetric layers load
with a plain ``from_pretrained``. Asymmetric group / channel layers do not (compressed-tensors builds
the empty model's zero points unpacked: a size mismatch); they load with
``quantization_config=CompressedTensorsConfig(dequantize=True)``, which :func:`load_exported` passes.
The folder is written next to its destination and renamed into place (:func:`~modelpress.core.io.atomic_dir`).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifact.hf import HFLogits, SentenceEncoder, import_transformers, quiet_loading
from ..core.data import call_model
from ..core.errors import ConfigError, ModelpressError, UnsupportedError, require
from ..core.io import atomic_dir
from ..nn.modules import get_module, set_module
from ..pruning.nm import verify_nm
from ..quantization.modules import QuantConv2d, QuantLinear

FORMAT = "pack-quantized"
# what a model folder holds beside its weights and config.json: the tokenizer, generation settings
# and sentence-transformers' pooling description (so the folder stays a sentence-transformers model)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
              "chat_template.jinja", "chat_template.json", "generation_config.json", "preprocessor_config.json",
              "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
SIDE_DIRS = ("1_Pooling", "2_Normalize")


class CompressedTensorsError(UnsupportedError):
    """A model or layer the compressed-tensors format cannot hold."""


class ExportMismatchError(ModelpressError):
    """The exported folder, loaded back, does not compute what the model does."""


@dataclass(frozen=True)
class ExportedFolder:
    """What :func:`export_compressed_tensors` wrote: the folder, a one-line ``note`` and the numbers."""

    path: Path
    note: str
    quantized: list[str] = field(default_factory=list)      # packed Linear layers
    sparse: list[str] = field(default_factory=list)         # 2:4 Linear layers
    ignored: list[str] = field(default_factory=list)        # Linear layers in float (quantization_config.ignore)
    quantized_params: int = 0                                # weights of the packed layers
    quantized_bytes: int = 0                                 # their weight_packed + scales + zero points + shapes
    file_bytes: int = 0                                      # model.safetensors

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight in the file, scales and zero points included."""
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else float("nan")


def hf_model_of(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside a modelpress wrapper (or ``model`` itself when it is one)."""
    transformers = import_transformers()
    inner = model.hf if isinstance(model, HFLogits) else model.backbone if isinstance(model, SentenceEncoder) else model
    if not isinstance(inner, transformers.PreTrainedModel):
        raise CompressedTensorsError(f"a {type(model).__name__} is not a Hugging Face transformers model: the "
                                     f"compressed-tensors format is a Hugging Face folder",
                                     hint="load the model from a Hugging Face folder (-m path/to/folder), or export "
                                          "it as ONNX or a modelpress artifact")
    return inner


def quantization_args(name: str, layer: QuantLinear):
    """compressed-tensors' ``QuantizationArgs`` of a packed layer's weights."""
    from compressed_tensors.quantization import QuantizationArgs

    if layer.act_bits is not None:
        raise CompressedTensorsError(f"layer {name!r} quantizes its activations to {layer.act_bits} bits (QAT): "
                                     f"compressed-tensors' weight-only formats cannot say so",
                                     hint="quantize without act_bits, or export ONNX")
    spec = layer.qspec
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=spec.granularity,
                            group_size=spec.group_size if spec.granularity == "group" else None)


def _ct_params(layer: QuantLinear, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our scales (and zero points, shifted to compressed-tensors' signed range) in its shapes."""
    spec = layer.qspec
    scale = layer.scale.detach().float().cpu().reshape(shape)
    if spec.symmetric:
        return scale, None
    # our asymmetric integers are unsigned (0 .. 2^b - 1); compressed-tensors' are signed
    # (-2^(b-1) .. 2^(b-1) - 1) with the zero point shifted alike: (q - z) * s is unchanged
    zero = layer.zero.detach().float().cpu().round() - 2 ** (spec.bits - 1)
    return scale, zero.reshape(shape).to(torch.int8)


def _expected_int8(layer: QuantLinear) -> torch.Tensor:
    """Our integers as compressed-tensors stores them (signed ``bits``-bit, int8)."""
    q = layer.int_weight()
    return (q if layer.qspec.symmetric else q - 2 ** (layer.qspec.bits - 1)).to(torch.int8)


def _check_architecture(hf: nn.Module, export: nn.Module, quantized: list[str]) -> None:
    """The exported tensors must fit the model ``config.json`` describes: no pruned channels or heads,
    no factorized or replaced layers, packed layers where the architecture has ``nn.Linear``."""
    with torch.device("meta"):
        ref = type(hf)(copy.deepcopy(export.config))
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in export.state_dict().items()}
    for name in quantized:
        kind = type(get_module(ref, name)).__name__
        if not isinstance(get_module(ref, name), nn.Linear):
            raise CompressedTensorsError(f"layer {name!r} is a {kind} in {type(hf).__name__}, a packed Linear in the "
                                         f"model: compressed-tensors packs nn.Linear weights only",
                                         hint="leave that layer in float (Scope(exclude=[...])), or export ONNX")
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            raise CompressedTensorsError(
                f"tensor {key!r} is {ours.get(key, 'missing')} in the model but {theirs.get(key, 'missing')} in the "
                f"{type(hf).__name__} its config.json describes (structural pruning, factorization or a replaced "
                f"layer changed the architecture)",
                hint="only quantization and N:M / unstructured sparsity keep the architecture; export ONNX or a "
                     "modelpress artifact instead")


def _source_dir(model: nn.Module, hf: nn.Module) -> Path | None:
    for cand in ((getattr(model, "zoo_spec", None) or {}).get("hf_dir"), getattr(hf, "name_or_path", None)):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def _copy_side_files(model: nn.Module, hf: nn.Module, dest: Path) -> list[str]:
    """Tokenizer (and sentence-transformers) files from the model's source folder, else from its tokenizer."""
    copied = []
    src = _source_dir(model, hf)
    if src is not None:
        for name in SIDE_FILES:
            if (src / name).is_file() and not (dest / name).exists():
                shutil.copy2(src / name, dest / name)
                copied.append(name)
        for name in SIDE_DIRS:
            if (src / name).is_dir():
                shutil.copytree(src / name, dest / name, dirs_exist_ok=True)
                copied.append(name + "/")
    tokenizer = getattr(model, "tokenizer", None)
    if not any(n.startswith("tokenizer") or n.startswith("vocab") for n in copied) \
            and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(dest))
        copied.append("tokenizer (saved)")
    return copied


def _float_copy(hf: nn.Module) -> tuple[nn.Module, dict[str, QuantLinear]]:
    """A CPU copy of ``hf`` whose packed layers are ``nn.Linear`` with the dequantized weights."""
    export = copy.deepcopy(hf).cpu()
    if getattr(export.config, "use_cache", None) is False:  # HFLogits turns the cache off for its one forward;
        export.config.use_cache = True                        # the folder is for generation too
    if isinstance(export.get_output_embeddings(), QuantLinear):
        # a packed head no longer shares the float input embeddings' tensor: say so, or transformers
        # ties the head back to them on load (and finds no `weight` on the packed head)
        for cfg in {id(c): c for c in (export.config, export.config.get_text_config())}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
    packed: dict[str, QuantLinear] = {}
    for name, m in list(export.named_modules()):
        if isinstance(m, QuantConv2d):
            raise CompressedTensorsError(f"layer {name!r} is a packed Conv2d: compressed-tensors packs Linear "
                                         f"weights only", hint="leave convolutions in float, or export ONNX")
        if not isinstance(m, QuantLinear):
            continue
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")  # no init
        lin.weight = nn.Parameter(m.dequantized_weight().detach().clone())
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().clone().to(lin.weight.dtype))
        set_module(export, name, lin)
        packed[name] = m
    for name, m in export.named_modules():
        if type(m).__module__.startswith("modelpress."):  # dynamic / static int8, codebooks, factors ...
            raise CompressedTensorsError(f"layer {name!r} is a modelpress {type(m).__name__}: the compressed-tensors "
                                         f"export holds weight-only packed Linear layers and 2:4 sparsity",
                                         hint="quantize with quant.weight_only or quant.gptq, or export ONNX")
    return export, packed


def _sparse_24(export: nn.Module) -> list[str]:
    return [name for name, m in export.named_modules()
            if isinstance(m, nn.Linear) and m.weight.shape[1] % 4 == 0 and bool((m.weight == 0).any())
            and verify_nm(m.weight, 2, 4)]


def _attach_and_compress(export: nn.Module, packed: dict[str, QuantLinear]):
    """Attach each packed layer's scheme and our qparams, run compressed-tensors' compressor on it and
    check its integers are ours; returns the ``ModelCompressor`` that writes the config."""
    from compressed_tensors.compressors import ModelCompressor, compress_module
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    args = {name: quantization_args(name, layer) for name, layer in packed.items()}
    kinds = {a.model_dump_json() for a in args.values()}
    one_group = len(kinds) == 1  # else each scheme names its layers (float Linear layers are in ignore)
    by_kind: dict[str, list[str]] = {}
    for name, a in args.items():
        by_kind.setdefault(a.model_dump_json(), []).append(name)
    for names in by_kind.values():
        # one scheme object per group of layers sharing it: config_groups are made from the distinct schemes
        targets = ["Linear"] if one_group else names
        scheme = QuantizationScheme(targets=targets, weights=args[names[0]])
        for name in names:
            lin = export.get_submodule(name)
            initialize_module_for_quantization(lin, scheme, force_zero_point=False)
            scale, zero = _ct_params(packed[name], tuple(lin.weight_scale.shape))
            with torch.no_grad():
                lin.weight_scale.copy_(scale.to(lin.weight_scale.dtype))
                if zero is not None:
                    lin.weight_zero_point.copy_(zero)
            lin.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(export, quantization_format=FORMAT)
    for name, layer in packed.items():
        lin = export.get_submodule(name)
        compress_module(lin, FORMAT)
        got = unpack_from_int32(lin.weight_packed, layer.qspec.bits, tuple(layer.weight_shape))
        if not torch.equal(got, _expected_int8(layer)):
            raise ExportMismatchError(f"layer {name!r}: compressed-tensors' packed integers differ from the model's",
                                      hint="report it with the model; the ONNX and artifact exports are unaffected")
    if compressor.quantization_config is not None:
        compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    return compressor


def _sparsity_config(export: nn.Module, sparse: list[str]) -> dict:
    """compressed-tensors' description of 2:4 layers stored dense (its ``dense`` sparsity format)."""
    from compressed_tensors.config import DenseSparsityConfig

    linears = [n for n, m in export.named_modules() if isinstance(m, nn.Linear)]
    weights = [p for n, p in export.named_parameters() if n.endswith("weight")]
    zeros = sum(int((p == 0).sum()) for p in weights)
    total = sum(p.numel() for p in weights)
    dense = [n for n in linears if n not in sparse]
    return DenseSparsityConfig(targets=["Linear"], ignore=dense,
                               global_sparsity=round(zeros / max(total, 1), 4),
                               sparsity_structure="2:4").model_dump(exclude={"registry_requires_subclass"})


def _write_config(path: Path, compressor, sparse: dict | None) -> None:
    if compressor is not None and compressor.quantization_config is not None:
        compressor.update_config(str(path))
    if sparse is None:
        return
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    block = cfg.setdefault("quantization_config", {"quant_method": "compressed-tensors", "format": "dense",
                                                   "config_groups": {}})
    block["sparsity_config"] = sparse
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _quantized_bytes(path: Path, names: list[str]) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.rpartition(".")[0] in names and key.rpartition(".")[2].startswith("weight_"):
                t = f.get_slice(key)
                numel = 1
                for s in t.get_shape():
                    numel *= s
                total += numel * {"I32": 4, "I64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1}[t.get_dtype()]
    return total


def export_compressed_tensors(model: nn.Module, path: str | os.PathLike, *,
                              check_inputs: Any = None) -> ExportedFolder:
    """Write the compressed Hugging Face ``model`` to the folder ``path`` in the compressed-tensors format.

    ``model`` is not changed. A folder already at ``path`` is replaced when it is a Hugging Face model
    folder (has ``config.json``) or empty. With ``check_inputs`` the folder is loaded back with
    transformers (:func:`load_exported`) and run on them next to ``model``: outputs further apart
    than float rounding raise :class:`ExportMismatchError` and nothing is written.
    """
    require("compressed_tensors", "nlp")
    hf = hf_model_of(model)
    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / "config.json").is_file() or not any(path.iterdir()))):
        raise ConfigError(f"{path} exists and is not a Hugging Face model folder",
                          hint="pick a new folder name; an existing model folder is replaced")
    export, packed = _float_copy(hf)
    _check_architecture(hf, export, list(packed))
    sparse = _sparse_24(export)
    compressor = _attach_and_compress(export, packed) if packed else None
    transformers = import_transformers()
    with atomic_dir(path) as tmp:
        with quiet_loading(transformers):
            export.save_pretrained(str(tmp))
        _write_config(tmp, compressor, _sparsity_config(export, sparse) if sparse else None)
        side = _copy_side_files(model, hf, tmp)
        ignored = list((compressor.quantization_config.ignore or []) if compressor and
                       compressor.quantization_config else [])
        result = ExportedFolder(path=path, note="", quantized=list(packed), sparse=sparse, ignored=ignored,
                                quantized_params=sum(m.weight_shape[0] * m.weight_shape[1] for m in packed.values()),
                                quantized_bytes=_quantized_bytes(tmp, list(packed)),
                                file_bytes=(tmp / "model.safetensors").stat().st_size)
        check = ""
        if check_inputs is not None:
            err = check_exported(tmp, model, check_inputs)
            check = f"; transformers vs modelpress max abs diff {err:.2e}"
    parts = []
    if packed:
        bits = sorted({m.qspec.bits for m in packed.values()})
        parts.append(f"{len(packed)} Linear layers {FORMAT} int{'/'.join(map(str, bits))} "
                     f"({result.bits_per_weight:.2f} bits per weight"
                     f"{'' if set(bits) <= {4, 8} else '; vLLM kernels take int4 / int8 only'})")
    if sparse:
        parts.append(f"{len(sparse)} Linear layers 2:4 sparse (stored dense)")
    if ignored:
        parts.append(f"float: {', '.join(ignored)}")
    if side:
        parts.append("copied " + ", ".join(side))
    note = "compressed-tensors: " + ("; ".join(parts) or "no quantized or 2:4 layers (plain folder)") + check
    return replace(result, note=note)


def load_exported(path: str | os.PathLike, cls_name: str | None = None) -> nn.Module:
    """The ``transformers`` model of an exported folder (``cls_name``: the architecture in config.json by
    default), decompressed on load when a layer is asymmetric (see the module docstring)."""
    transformers = import_transformers()
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    cls_name = cls_name or (cfg.get("architectures") or ["AutoModel"])[0]
    cls = getattr(transformers, cls_name, None) or transformers.AutoModel
    groups = (cfg.get("quantization_config") or {}).get("config_groups") or {}
    asymmetric = any(not (g.get("weights") or {}).get("symmetric", True) for g in groups.values())
    kwargs = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if asymmetric else {}
    with quiet_loading(transformers), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")  # dequantize is meant
        return cls.from_pretrained(str(path), local_files_only=True, **kwargs).eval()


def check_exported(path: str | os.PathLike, model: nn.Module, inputs: Any, rtol: float = 1e-4) -> float:
    """Max abs difference between ``model`` and the folder loaded back with transformers, on ``inputs``
    (raises :class:`ExportMismatchError` past ``rtol`` of the output's range: the weights are the same
    numbers, so only float rounding may differ)."""
    hf = hf_model_of(model)
    back = load_exported(path, type(hf).__name__)
    wrapped = HFLogits(back) if isinstance(model, HFLogits) else SentenceEncoder(back) \
        if isinstance(model, SentenceEncoder) else back
    with torch.no_grad():
        ref, got = call_model(model.eval(), inputs), call_model(wrapped, inputs)
    ref, got = (t if isinstance(t, torch.Tensor) else t[0] for t in (ref, got))
    err = float((ref.float() - got.float()).abs().max())
    limit = rtol * float(ref.abs().max()) + 1e-5
    if not err <= limit:
        raise ExportMismatchError(f"{path}: transformers' output differs from the model's by {err:.3g} "
                                  f"(> {limit:.3g})", hint="report it with the model and the versions of "
                                                           "transformers and compressed-tensors")
    return err
