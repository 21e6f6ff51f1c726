"""The decoder-LM testbed: a small Llama trained here, once, on the Python standard library's source.

No LLM weights can be downloaded, so the transformer-era methods (``quant.gptq``, ``prune.wanda``,
``prune.sparsegpt`` ...) are judged on a decoder trained on this machine: Llama's architecture
(RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention) from ``transformers.LlamaConfig``,
quality = perplexity on held-out text.

* corpus: the standard library's top-level modules (``Lib/*.py`` under
  ``sysconfig.get_paths()["stdlib"]``: source, comments and docstrings), in file-name order; a
  file is held out when the SHA-1 of its name is 0 mod 10 (about 10% of the files, never trained
  on, never in calibration). Another Python version has another stdlib: the cache keys hold a
  digest of the text, so it trains its own model;
* tokenizer: byte-level BPE (``tokenizers``) trained on the training files, saved as
  ``tokenizer.json`` + ``PreTrainedTokenizerFast`` files; ``<|endoftext|>`` (id 0) ends each file;
* model: ``LlamaForCausalLM`` trained with AdamW from a fixed seed, saved as a Hugging Face folder
  (``config.json``, ``model.safetensors``, tokenizer files, ``testbed.json`` with how it was made)
  in ``$MODELPRESS_CACHE/lm/``; loaded through :func:`~modelpress.artifact.hf.load_hf_dir`
  (:class:`~modelpress.artifact.hf.HFLogits`), like any local HF folder.

* ``pylm`` (dataset ``pystdlib``): all top-level modules (1.07M training tokens); vocab 4096, 256
  wide, 4 layers, 8 heads / 2 KV heads, SwiGLU 640, blocks of 128 tokens; 4.7M parameters; 400 steps
  of 16 blocks (2340 s on 1 thread of a 2-core machine busy with other jobs: a one-time cost);
* ``pylm-tiny`` (dataset ``pystdlib-tiny``): ~400 KB of the training files; vocab 512, 128 wide,
  2 layers, 4 / 2 heads, SwiGLU 256, blocks of 64; 0.43M parameters, 100 steps (seconds: tests, CI).

A model goes with its own dataset (the same tokenizer): ``modelpress evaluate -m pylm -d pystdlib``,
``modelpress quantize gptq -m pylm-tiny -d pystdlib-tiny -o runs/q --set bits=4 --no-latency``.
The datasets' train split is a ``DataLoader`` of ``batch`` blocks (default 8, shuffled once with the
seed), so a layer-wise method's ``calibration_batches=16`` calibrates on 128 blocks; the test split
is ``eval_blocks`` evenly spaced held-out blocks (default 256, the ones scored in ``testbed.json``; 0: all).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..artifact.hf import import_transformers, load_hf_dir, quiet_loading
from ..core.errors import DataError, ModelLoadError, require
from ..core.progress import log, progress_bar
from ..tasks.base import DatasetBundle
from ..tasks.datasets import register_dataset
from ..tasks.language_modelling import LanguageModelling, TokenBlocks, lm_quality
from .baselines import cache_dir
from .models import register_model

EOS = "<|endoftext|>"
MAX_TEXT_BYTES = 256 << 20  # a text:FILE dataset
EVAL_BLOCKS = 256  # held-out blocks (evenly spaced) scored by default and right after training (testbed.json)


@dataclass(frozen=True)
class LMTestbed:
    """One decoder testbed: its corpus slice, tokenizer, architecture and training run."""

    model: str  # zoo model name
    dataset: str  # dataset name
    vocab_size: int
    block: int  # tokens per training / evaluation block
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    steps: int  # AdamW steps of `batch_size` random training blocks
    batch_size: int
    lr: float
    warmup: int
    train_bytes: int | None = None  # the first files (name order) up to this much text; None: all
    test_bytes: int | None = None
    seed: int = 0


TESTBEDS = {
    "pylm": LMTestbed("pylm", "pystdlib", vocab_size=4096, block=128, hidden=256, layers=4, heads=8, kv_heads=2,
                      intermediate=640, steps=400, batch_size=16, lr=2e-3, warmup=40),
    "pylm-tiny": LMTestbed("pylm-tiny", "pystdlib-tiny", vocab_size=512, block=64, hidden=128, layers=2, heads=4,
                           kv_heads=2, intermediate=256, steps=100, batch_size=16, lr=5e-3, warmup=10,
                           train_bytes=400_000, test_bytes=60_000),
}


# -- corpus ---------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda p: p.name)
    if not files:
        raise DataError(f"no Python files under the standard library folder {root}",
                        hint="this Python installation ships no stdlib sources; the pylm testbed needs them")
    return files


def is_held_out(name: str) -> bool:
    """A file is held out (never trained or calibrated on) when the SHA-1 of its name is 0 mod 10."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10 == 0


def _take(files: list[Path], max_bytes: int | None) -> list[tuple[str, str]]:
    out, total = [], 0
    for f in files:
        if max_bytes is not None and total >= max_bytes:
            break
        text = f.read_text(encoding="utf-8", errors="replace")
        out.append((f.name, text))
        total += len(text.encode())
    return out


def corpus(bed: LMTestbed) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, held_out)`` lists of ``(file name, text)`` of the testbed's corpus."""
    files = stdlib_files()
    return (_take([f for f in files if not is_held_out(f.name)], bed.train_bytes),
            _take([f for f in files if is_held_out(f.name)], bed.test_bytes))


def _digest(*parts: object) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:10]


def _corpus_key(bed: LMTestbed, train, test) -> str:
    text = hashlib.sha1("\0".join(n + "\0" + t for n, t in train + test).encode()).hexdigest()
    return _digest(text, bed.vocab_size, len(train), len(test))


def _publish(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place in one rename (a concurrent builder's copy wins)."""
    try:
        os.chmod(tmp, 0o755)  # mkdtemp made it private; a cache folder reads like any other
        os.replace(tmp, dest)
    except OSError:  # dest appeared meanwhile (another process): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_dir(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))


def tokenized_corpus(bed: LMTestbed) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The testbed's tokenizer folder and its ``(train, held_out)`` token streams (int64; each
    file ends with ``<|endoftext|>``), built once and cached in ``$MODELPRESS_CACHE/lm/``."""
    from safetensors.torch import load_file, save_file

    train, test = corpus(bed)
    folder = cache_dir() / "lm" / f"{bed.dataset}-bpe{bed.vocab_size}-{_corpus_key(bed, train, test)}"
    tokens = folder / "tokens.safetensors"
    if not tokens.is_file():
        tmp = _fresh_dir(folder)
        try:
            log(f"[dim]{bed.dataset}: training a byte-level BPE tokenizer ({bed.vocab_size} tokens) on "
                f"{len(train)} files[/dim]")
            tok = _train_tokenizer([t for _, t in train], bed.vocab_size)
            tok.save_pretrained(str(tmp))
            streams = {split: _stream(tok, docs) for split, docs in (("train", train), ("test", test))}
            save_file(streams, str(tmp / "tokens.safetensors"))
            (tmp / "files.json").write_text(json.dumps({"train": [n for n, _ in train], "test": [n for n, _ in test]},
                                                       indent=1))
            _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    streams = load_file(str(tokens))
    return folder, streams["train"], streams["test"]


def _train_tokenizer(texts: list[str], vocab_size: int):
    transformers = import_transformers()
    tk = require("tokenizers", "nlp")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                                pad_token=EOS)


def _stream(tokenizer, docs: list[tuple[str, str]]) -> torch.Tensor:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch([t for _, t in docs]):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


# -- data -----------------------------------------------------------------------------------
def lm_bundle(bed: LMTestbed, seed: int = 0, block: int | None = None, batch: int = 8,
              eval_blocks: int = EVAL_BLOCKS) -> DatasetBundle:
    """Train blocks (shuffled once with ``seed``, batches of ``batch``) and held-out blocks
    (``eval_blocks`` evenly spaced ones, 0: all) of the testbed's corpus."""
    if batch < 1 or (block is not None and block < 2) or eval_blocks < 0:
        raise DataError(f"{bed.dataset}: batch >= 1, block >= 2 and eval_blocks >= 0 (got batch={batch}, "
                        f"block={block}, eval_blocks={eval_blocks})")
    folder, train_ids, test_ids = tokenized_corpus(bed)
    block = block or bed.block
    train = TokenBlocks.from_stream(train_ids, block)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    train = TokenBlocks(train.ids[order])
    test = TokenBlocks.from_stream(test_ids, block)
    if 0 < eval_blocks < len(test):
        test = TokenBlocks(test.ids[torch.linspace(0, len(test) - 1, eval_blocks).round().long()])
    meta = {"tokenizer": str(folder), "block": block, "seed": seed, "train_tokens": int(train_ids.numel()),
            "test_tokens": int(test_ids.numel()), "vocab_size": bed.vocab_size, "source": "python stdlib Lib/*.py"}
    return DatasetBundle(bed.dataset, DataLoader(train, batch_size=batch, shuffle=False), test, LanguageModelling(),
                         None, (block,), meta)


def _register_dataset(bed: LMTestbed) -> None:
    @register_dataset(bed.dataset, options={"block": int, "batch": int, "eval_blocks": int},
                      summary=f"Python stdlib source as token blocks for {bed.model} (held-out files: test)")
    def build(path, seed, block: int | None = None, batch: int = 8, eval_blocks: int = EVAL_BLOCKS):
        return lm_bundle(bed, seed, block, batch, eval_blocks)


@register_dataset("text", needs_path=True,
                  options={"tokenizer": str, "block": int, "batch": int, "test_fraction": float},
                  summary="your text file as token blocks (language modelling): the last 10% is the test split")
def text_bundle(path, seed, tokenizer: str | None = None, block: int = 128, batch: int = 8,
                test_fraction: float = 0.1) -> DatasetBundle:
    """A UTF-8 text file tokenized with ``tokenizer`` (a Hugging Face folder, e.g. the model's; default:
    pylm's BPE), cut into blocks: the last ``test_fraction`` of the tokens is held out."""
    from .corpora import load_tokenizer

    if not 0 < test_fraction < 1 or block < 2 or batch < 1:
        raise DataError(f"text: 0 < test_fraction < 1, block >= 2, batch >= 1 (got {test_fraction}, {block}, {batch})")
    path = Path(path)
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise DataError(f"text file {str(path)!r} is {path.stat().st_size:,} bytes (at most {MAX_TEXT_BYTES:,})",
                            hint="use a sample of the text")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read text file {str(path)!r}: {exc}", hint="a UTF-8 text file is expected") from None
    tok_dir = Path(tokenizer).expanduser() if tokenizer else tokenized_corpus(TESTBEDS["pylm"])[0]
    tok = load_tokenizer(tok_dir)
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)
    n_test = int(ids.numel() * test_fraction)
    if n_test < block or ids.numel() - n_test < block:
        raise DataError(f"text file {str(path)!r} has {ids.numel():,} tokens: too few for a train and a test block "
                        f"of {block} tokens", hint="use more text, a smaller ?block= or another ?test_fraction=")
    train = TokenBlocks.from_stream(ids[:-n_test], block)
    train = TokenBlocks(train.ids[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))])
    test = TokenBlocks.from_stream(ids[-n_test:], block)
    return DatasetBundle("text", DataLoader(train, batch_size=batch, shuffle=False), test, LanguageModelling(), None,
                         (block,), {"source": str(path), "tokenizer": str(tok_dir), "block": block, "seed": seed})


def unigram_perplexity(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of the add-one unigram model of ``train_ids`` on the next tokens of ``test_ids``
    (what a model that ignores context can reach; a uniform model scores ``vocab_size``)."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[test_ids[1:]].mean()))


# -- model ----------------------------------------------------------------------------------
def model_dir(bed: LMTestbed) -> Path:
    """Where the trained testbed lives: ``$MODELPRESS_CACHE/lm/<model>-<key of corpus + spec>``."""
    folder, _, _ = tokenized_corpus(bed)
    return cache_dir() / "lm" / f"{bed.model}-{_digest(folder.name, asdict(bed), torch.__version__.split('+')[0])}"


def llama_config(bed: LMTestbed):
    return import_transformers().LlamaConfig(
        vocab_size=bed.vocab_size, hidden_size=bed.hidden, intermediate_size=bed.intermediate,
        num_hidden_layers=bed.layers, num_attention_heads=bed.heads, num_key_value_heads=bed.kv_heads,
        max_position_embeddings=max(512, 4 * bed.block), rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)


def train_lm(bed: LMTestbed, dest: Path | None = None) -> Path:
    """Train the testbed from its seed and save it as a Hugging Face folder (default :func:`model_dir`)."""
    transformers = import_transformers()
    tok_dir, train_ids, test_ids = tokenized_corpus(bed)
    dest = dest or model_dir(bed)
    torch.manual_seed(bed.seed)
    with quiet_loading(transformers):
        model = transformers.LlamaForCausalLM(llama_config(bed))
    blocks = TokenBlocks.from_stream(train_ids, bed.block).ids
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=bed.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to a tenth
        if step < bed.warmup:
            return (step + 1) / bed.warmup
        t = (step - bed.warmup) / max(1, bed.steps - bed.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(bed.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"training {bed.model} ({n_params:,} parameters) on {train_ids.numel():,} tokens: {bed.steps} steps "
        f"of {bed.batch_size} x {bed.block} tokens (cached in {dest})")
    t0, losses = time.perf_counter(), []
    model.train()
    with progress_bar(f"train {bed.model}", total=bed.steps) as advance:
        for _ in range(bed.steps):
            x = blocks[torch.randint(len(blocks), (bed.batch_size,), generator=gen)]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            advance(note=f"loss {losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    model.eval()
    held_out = TokenBlocks.from_stream(test_ids, bed.block)
    held_out = TokenBlocks(held_out.ids[torch.linspace(0, len(held_out) - 1, min(len(held_out), EVAL_BLOCKS))
                                        .round().long()])
    quality = lm_quality(_Logits(model), held_out)
    tmp = _fresh_dir(dest)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in tok_dir.iterdir():
            if f.name != "tokens.safetensors" and f.is_file():
                shutil.copy2(f, tmp / f.name)
        info = {"testbed": asdict(bed), "parameters": n_params, "train_seconds": round(seconds, 1),
                "threads": torch.get_num_threads(), "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
                "held_out": quality, "held_out_blocks": len(held_out),
                "unigram_perplexity": unigram_perplexity(train_ids, test_ids, bed.vocab_size),
                "torch": torch.__version__, "transformers": transformers.__version__}
        (tmp / "testbed.json").write_text(json.dumps(info, indent=2))
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{bed.model}: trained in {seconds:.0f} s, held-out perplexity {quality['perplexity']:.2f} "
        f"(unigram {info['unigram_perplexity']:.1f})")
    return dest


class _Logits(nn.Module):
    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids):
        return self.hf(input_ids=input_ids).logits


def pretrained_lm(bed: LMTestbed) -> nn.Module:
    """The trained testbed as :class:`~modelpress.artifact.hf.HFLogits` (trained now when not cached)."""
    folder = model_dir(bed)
    if not (folder / "model.safetensors").is_file():
        train_lm(bed, folder)
    try:
        return load_hf_dir(folder)
    except ModelLoadError as exc:
        raise ModelLoadError(f"the cached {bed.model} in {folder} is unusable ({exc})",
                             hint=f"delete {folder}; it is retrained on the next use") from None


def _register_model(bed: LMTestbed) -> None:
    @register_model(bed.model)
    def build() -> nn.Module:
        return pretrained_lm(bed)

    build.__doc__ = f"Llama-style decoder trained on the Python stdlib (use with -d {bed.dataset}); see zoo/pylm.py."


for _bed in TESTBEDS.values():
    _register_model(_bed)
    _register_dataset(_bed)
