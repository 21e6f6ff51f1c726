"""The CLI through its entry point: ``main()`` in this process (``cli``) for the commands, the installed
``modelpress`` script in a subprocess (``run``) where the process itself matters (exit status, SIGKILL)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modelpress.artifact.checkpoint import load_state

EXE = str(Path(sys.executable).parent / "modelpress")
FAST = ["--set", "baseline.train.epochs=1", "--set", "stage.1.finetune.epochs=0.5",
        "--set", "eval.latency=false", "--set", "eval.onnx=false"]


def run(*args, env_extra=None, check=True, timeout=300):
    env = {**os.environ, "MODELPRESS_PROGRESS": "0", "COLUMNS": "200", **(env_extra or {})}
    res = subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def _main(args) -> int:
    from modelpress.cli import main

    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["modelpress", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli(*args, check=True)``: ``modelpress.cli.main`` on ``args`` in this process (no interpreter and
    torch start-up per command), returning a CompletedProcess-like result with the exit status."""
    monkeypatch.setenv("COLUMNS", "200")

    def invoke(*args, check=True):
        capsys.readouterr()
        code = _main(args)
        out = capsys.readouterr()
        res = subprocess.CompletedProcess(args, code, out.out, out.err)
        if check and code != 0:
            raise AssertionError(f"exit {code}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
        return res
    return invoke


@pytest.fixture(scope="module")
def lenet5_digits(tmp_path_factory):
    """`modelpress train lenet5 --data digits --epochs 2`, run once for the commands that start from it."""
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert _main(["train", "lenet5", "--data", "digits", "--epochs", "2", "--out", path]) == 0
    return path


def test_help_lists_commands_and_each_has_examples(cli):
    res = run("--help")  # the installed script
    for cmd in ("list", "train", "evaluate", "analyze", "compress", "recipes", "demo"):
        assert cmd in res.stdout
        sub = cli(cmd, "--help")
        assert "Examples" in sub.stdout or "Example" in sub.stdout, cmd


def test_list_methods_and_models(cli):
    assert "prune.magnitude" in cli("list").stdout
    res = cli("list", "--models")
    assert "lenet5" in res.stdout and "mnist5k" in res.stdout


def _one_line_error(res, message):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert message in res.stderr.replace("\n", " ")
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert any(ln.startswith("hint:") for ln in res.stderr.splitlines())


@pytest.mark.parametrize("args, message", [
    (["compress", "-r", "nope", "-o", "x"], "neither a file nor a built-in recipe"),
    (["compress", "-r", "lenet5-prune", "-o", "{tmp}/r", *FAST, "--set", "stage.1.sparsity=1.2"],
     "lenet5-prune.yaml.stages.0.config.sparsity"),
    (["compress", "-r", "lenet5-prune", "-o", "{tmp}/r", *FAST, "--set", "stage.1.scope.include=[conv9]"],
     "'conv9' matches no layer"),
    (["evaluate", "-m", "lenet5", "-d", "mnist-idx:/nonexistent"], "/nonexistent"),
])
def test_errors_are_one_line_with_hint_and_nonzero_exit(cli, tmp_path, args, message):
    _one_line_error(cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], check=False), message)


def test_the_installed_script_exits_2_with_one_error_line():
    _one_line_error(run("evaluate", "-m", "no_such_model", check=False), "is not a file, a directory or a zoo model")


def test_recipes_list_and_show(cli):
    assert "lenet5-prune" in cli("recipes").stdout
    assert "prune.magnitude" in cli("recipes", "--show", "lenet5-prune").stdout


def _state(path):
    return load_state(path)[0]


def test_compress_writes_run_folder_and_resumes_after_sigkill(cli, tmp_path):
    # uninterrupted reference run
    ref = tmp_path / "ref"
    slow = [*FAST, "--set", "stage.1.finetune.epochs=1"]  # long enough to be killed mid-stage
    res = cli("compress", "-r", "lenet5-prune", "-o", str(ref), *slow)
    for f in ("recipe.yaml", "baseline.safetensors", "stages/01-prune/model.safetensors",
              "stages/01-prune/metrics.json", "model.safetensors", "report.json", "report.md"):
        assert (ref / f).exists(), f
    report = json.loads((ref / "report.json").read_text())
    base, final = report["rows"]
    assert base["label"] == "baseline" and final["label"] == "prune"
    assert final["artifact_bytes"] < base["artifact_bytes"] / 5  # 90% sparse, stored sparse
    assert final["accuracy"] > 0.8
    assert "| model |" in (ref / "report.md").read_text()

    # a run killed during its only stage, then rerun: same final weights
    run_dir = tmp_path / "killed"
    env = {**os.environ, "MODELPRESS_PROGRESS": "0"}
    proc = subprocess.Popen([EXE, "compress", "-r", "lenet5-prune", "-o", str(run_dir), *slow],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (run_dir / "baseline.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model.safetensors").exists()
    res = cli("compress", "-r", "lenet5-prune", "-o", str(run_dir), *slow)
    assert "resuming" in res.stderr
    a, b = _state(ref / "model.safetensors"), _state(run_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(run_dir.rglob("*.tmp"))  # no half-written file left behind


def test_resume_refuses_a_different_recipe(cli, tmp_path):
    from modelpress.recipes.schema import Recipe

    # a run folder as a previous run leaves it (its resolved recipe is written first)
    (tmp_path / "recipe.yaml").write_text(Recipe.load("lenet5-prune", FAST[1::2]).to_yaml())
    res = cli("compress", "-r", "lenet5-prune", "-o", str(tmp_path), *FAST, "--set", "seed=5", check=False)
    assert res.returncode == 2 and "different recipe" in res.stderr


def test_train_evaluate_analyze_on_user_factory(cli, tmp_path):
    model_py = tmp_path / "net.py"
    model_py.write_text("import torch.nn as nn\n"
                        "def build():\n"
                        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))\n")
    art = tmp_path / "net.safetensors"
    res = cli("train", f"{model_py}:build", "--data", "digits", "--epochs", "3", "--out", str(art))
    assert "test accuracy" in res.stdout and art.exists()
    # the artifact names a factory: loading it needs explicit trust
    res = cli("evaluate", "-m", str(art), "-d", "digits", check=False)
    assert res.returncode == 2 and "--trust-remote-code" in res.stderr
    res = cli("evaluate", "-m", str(art), "-d", "digits", "--trust-remote-code")
    assert json.loads(res.stdout)["accuracy"] > 0.8
    out_json = tmp_path / "a.json"
    cli("analyze", "-m", str(art), "-d", "digits", "--no-onnx", "--batch-sizes", "1",
        "--json", str(out_json), "--trust-remote-code")
    rep = json.loads(out_json.read_text())
    assert rep["params"]["total"] == 784 * 32 + 32 + 32 * 10 + 10


def test_prune_command_runs_one_method_with_config_overrides(cli, tmp_path, lenet5_digits):
    base = lenet5_digits
    res = cli("prune", "magnitude", "-m", str(base), "-o", str(tmp_path / "p"), "--set", "sparsity=0.75",
              "--set", "ranking=layer", "--finetune", "0.2", "--no-latency")
    rows = json.loads((tmp_path / "p" / "report.json").read_text())["rows"]
    assert rows[1]["nonzero"] < rows[0]["nonzero"]
    assert "magnitude" in res.stdout
    res = cli("prune", "magnitud", "-m", str(base), "-o", str(tmp_path / "q"), check=False)
    assert res.returncode == 2 and "unknown method 'prune.magnitud'" in res.stderr


def test_sensitivity_command_writes_table_plot_and_ratios(cli, tmp_path):
    base = tmp_path / "base.safetensors"
    cli("train", "lenet300", "--data", "digits", "--epochs", "2", "--out", str(base))
    res = cli("sensitivity", "-m", str(base), "-d", "digits", "-o", str(tmp_path / "s"),
              "--sparsities", "0.5,0.9", "--target", "0.8")
    doc = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert set(doc["curves"]) == {"fc2"}  # lenet300: fc1 and fc3 (first/last) are left out
    assert doc["ratios_for_target"]["layer_sparsity"]["fc2"] == pytest.approx(0.8, abs=1e-3)
    png = (tmp_path / "s" / "sensitivity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "fc2" in res.stdout


def test_prune_channels_command_shrinks_the_saved_model(cli, tmp_path):
    """`prune channels` removes channels physically: the artifact reloads with fewer params and MACs."""
    base = tmp_path / "base.safetensors"
    cli("train", "resnet_small", "--data", "digits", "--epochs", "1", "--out", str(base))
    cli("prune", "channels", "-m", str(base), "-d", "digits", "-o", str(tmp_path / "c"),
        "--set", "target_macs_reduction=0.5", "--finetune", "0.5", "--no-latency")
    rows = json.loads((tmp_path / "c" / "report.json").read_text())["rows"]
    assert rows[1]["params"] < 0.7 * rows[0]["params"]
    assert rows[1]["macs"] <= 0.5 * rows[0]["macs"] + 1
    from modelpress import load_artifact
    model, _ = load_artifact(tmp_path / "c" / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == rows[1]["params"]
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_quantize_factorize_and_export_commands(cli, tmp_path, lenet5_digits):
    base = lenet5_digits
    cli("quantize", "weight_only", "-m", str(base), "-d", "digits", "-o", str(tmp_path / "w4"),
        "--set", "bits=4", "--no-latency")
    rows = json.loads((tmp_path / "w4" / "report.json").read_text())["rows"]
    assert rows[1]["artifact_bytes"] < rows[0]["artifact_bytes"] / 4
    cli("factorize", "svd", "-m", str(base), "-d", "digits", "-o", str(tmp_path / "svd"),
        "--set", "param_ratio=0.5", "--no-latency")
    rows = json.loads((tmp_path / "svd" / "report.json").read_text())["rows"]
    assert rows[1]["params"] < rows[0]["params"]
    cli("quantize", "static_int8", "-m", str(base), "-d", "digits", "-o", str(tmp_path / "s8"), "--no-latency")
    res = cli("export", "-m", str(tmp_path / "s8" / "model.safetensors"), "-d", "digits", "-o",
              str(tmp_path / "s8.onnx"))
    assert "int8 QDQ" in res.stdout and (tmp_path / "s8.onnx").stat().st_size < base.stat().st_size
    res = cli("export", "-m", str(base), "-d", "digits", "-o", str(tmp_path / "x.bin"), "--format", "coreml",
              check=False)
    assert res.returncode == 2 and "--format" in res.stderr and not (tmp_path / "x.bin").exists()


def test_distill_command_runs_kd_self_and_quantization_aware_distillation(cli, tmp_path, lenet5_digits):
    base = lenet5_digits
    cli("distill", "-m", "lenet300", "-t", str(base), "-d", "digits", "-o", str(tmp_path / "kd"),
        "--set", "T=3", "--epochs", "1", "--no-latency")
    rows = json.loads((tmp_path / "kd" / "report.json").read_text())["rows"]
    assert rows[1]["accuracy"] > 0.5
    cli("distill", "self", "-m", str(base), "-d", "digits", "-o", str(tmp_path / "self"), "--epochs", "0.5",
        "--no-latency")
    rows = json.loads((tmp_path / "self" / "report.json").read_text())["rows"]
    assert rows[1]["params"] == rows[0]["params"]  # the exit heads are gone
    cli("distill", "qat", "-m", str(base), "-d", "digits", "-o", str(tmp_path / "qad"), "--epochs", "0.5",
        "--set", "quant.weight_bits=4", "--set", "quant.observer_steps=5", "--no-latency")
    rows = json.loads((tmp_path / "qad" / "report.json").read_text())["rows"]
    assert rows[1]["artifact_bytes"] < rows[0]["artifact_bytes"] / 3
    res = cli("distill", "kd", "-m", "lenet300", "-d", "digits", "-o", str(tmp_path / "x"), check=False)
    assert res.returncode == 2 and "--teacher" in res.stderr


def test_search_command_rejects_a_bad_budget_and_space_before_any_work(cli, tmp_path):
    res = cli("search", "-m", "lenet300", "-d", "digits", "--budget", "size<5", "-o", str(tmp_path / "s"), check=False)
    assert res.returncode == 2 and "METRIC=VALUE" in res.stderr
    res = cli("search", "-m", "lenet300", "-d", "digits", "--budget", "bytes=5000", "--set", "bits=[0]",
              "-o", str(tmp_path / "s"), check=False)
    assert res.returncode == 2 and "bits" in res.stderr


# -- the user's sentence encoder, text and graded pairs -------------------------------------------
WORDS = ("a man woman child dog cat is are was plays playing eats eating reads sleeps runs the guitar piano "
         "food book ball park on in at home today quickly slowly happy tired . , ?").split()


def own_encoder(folder):
    """A 4-layer BERT with its own 40-word vocabulary: MiniLM's token ids would not fit it."""
    transformers = pytest.importorskip("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    tok = transformers.BertTokenizer(str(vocab))
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_sentence_encoder_recipe_on_the_users_encoder_and_files(cli, tmp_path):
    pytest.importorskip("onnxruntime")
    model_dir = own_encoder(tmp_path / "enc")
    text = tmp_path / "sentences.txt"
    subjects, verbs, objects = ("a man", "a woman", "the child", "a dog"), ("plays", "reads", "eats"), \
        ("the guitar", "a book", "the food", "the ball")
    text.write_text("\n".join(f"{s} {v} {o} in the park ." for s in subjects for v in verbs for o in objects),
                    encoding="utf-8")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("4.8\ta cat sleeps at home .\ta cat is sleeping at home .\n"
                     "0.4\ta cat sleeps at home .\tthe child runs quickly today .\n"
                     "2.5\ta woman is happy .\ta woman is tired .\n", encoding="utf-8")
    out = tmp_path / "run"
    res = cli("compress", "-r", "sentence-encoder-distill-int8", "-m", f"hf:{model_dir}",
              "-d", f"sentences:{text}?pairs={pairs}", "-o", out,
              "--set", "stage.1.finetune.max_steps=2", "--set", "eval.latency=false")
    assert "model.onnx" in res.stdout
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["baseline", "shallow", "int8", "deployed: model.onnx (ONNX Runtime)"]
    assert all({"spearman", "fidelity"} <= set(r) for r in rows)
    assert rows[1]["params"] < rows[0]["params"] and (out / "model.onnx").stat().st_size == rows[-1]["artifact_bytes"]
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert len(stages[0]["kept"]) == 2 and stages[0]["stack"] == "backbone.encoder.layer"
