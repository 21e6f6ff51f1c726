"""Keras models in (artifact/keras.py): every supported layer converts and computes what Keras
computes (max abs difference <= 1e-4 on the same float32 inputs, NHWC), the seeds' LeNet-5 and
MobileNetV2 included; structured pruning runs on converted models; errors are one line."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported; the loader does the same
keras = pytest.importorskip("keras")
layers = keras.layers

import modelpress  # noqa: E402
from modelpress.artifact.checkpoint import save_artifact  # noqa: E402
from modelpress.artifact.loading import load_artifact, load_model  # noqa: E402
from modelpress.core.errors import ModelLoadError, UnsupportedError  # noqa: E402
from modelpress.pruning.structured import ChannelPruning  # noqa: E402

TOL = 1e-4


def _inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in model.inputs:
        shape = (3, *t.shape[1:])
        if "int" in str(t.dtype):
            out.append(rng.integers(0, 20, shape).astype("int64"))
        else:
            out.append(rng.standard_normal(shape).astype("float32"))
    return out


def _run_torch(module, xs):
    with torch.no_grad():
        out = module(*[torch.from_numpy(x) for x in xs])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _run_keras(model, xs):
    out = model(xs if len(xs) > 1 else xs[0], training=False)
    return [keras.ops.convert_to_numpy(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def _max_diff(model, module, xs=None) -> float:
    xs = xs or _inputs(model)
    ref, got = _run_keras(model, xs), _run_torch(module, xs)
    assert [r.shape for r in ref] == [g.shape for g in got]
    return max(float(np.abs(r - g).max()) for r, g in zip(ref, got))


def _saved(model, tmp_path, suffix=".keras"):
    path = tmp_path / f"{model.name}{suffix}"
    model.save(path)
    return load_model(path)


def _randomize_bn(model, seed=1):
    """Non-trivial BatchNorm statistics, so a wrong mean/variance would show."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if i in (0, 3) else
                               rng.normal(0, 0.3, w.shape).astype("float32")
                               for i, w in enumerate(layer.get_weights())])


# -- one tiny model per group of layers ------------------------------------------------------------
def conv2d():
    x = inp = keras.Input((9, 10, 4))
    x = layers.Conv2D(6, 3, strides=2, padding="same", activation="relu6")(x)  # uneven 'same' padding
    x = layers.Conv2D(6, (3, 2), padding="same", dilation_rate=2, use_bias=False, activation="swish")(x)
    x = layers.Conv2D(4, 3, groups=2, activation="gelu")(x)
    x = layers.Conv2D(4, 1, activation="tanh")(x)
    return keras.Model(inp, layers.Dense(5, activation="softmax")(layers.Flatten()(x)), name="conv2d")


def conv1d():
    x = inp = keras.Input((12, 3))
    x = layers.Conv1D(4, 3, padding="causal", activation="elu")(x)
    x = layers.Conv1D(4, 3, strides=2, padding="same")(x)
    a = layers.MaxPooling1D(2, padding="same")(x)
    a = layers.AveragePooling1D(2)(a)
    b = layers.ZeroPadding1D((1, 2))(x)
    out = layers.Concatenate()([layers.GlobalAveragePooling1D()(a), layers.GlobalMaxPooling1D()(b)])
    return keras.Model(inp, layers.Dense(3)(out), name="conv1d")


def depthwise_separable():
    x = inp = keras.Input((8, 8, 3))
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="hard_sigmoid")(x)
    x = layers.SeparableConv2D(5, 3, strides=2, padding="same", depth_multiplier=2, activation="hard_swish")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(max_value=6.0)(x)
    x = layers.GlobalAveragePooling2D(keepdims=True)(x)
    return keras.Model(inp, layers.Dense(4)(layers.Flatten()(x)), name="depthwise_separable")


def transpose():
    x = inp = keras.Input((5, 5, 3))
    x = layers.Conv2DTranspose(4, 3, strides=2, padding="same")(x)  # uneven: cropped after
    x = layers.Conv2DTranspose(2, 4, strides=2, padding="same", activation="selu")(x)
    x = layers.Conv2DTranspose(2, 3, padding="valid", use_bias=False)(x)
    x = layers.UpSampling2D(2)(x)
    x = layers.Dense(3)(x)  # Dense on an image: its last (channel) axis
    return keras.Model(inp, x, name="transpose")  # an image out: NHWC again


def pooling():
    x = inp = keras.Input((7, 7, 3))
    a = layers.MaxPooling2D(3, strides=2, padding="same")(x)  # 7 -> 4: even
    b = layers.AveragePooling2D(3, strides=2, padding="same")(x)
    c = layers.Concatenate(axis=-1)([a, b])
    c = layers.Concatenate(axis=1)([c, c])  # a spatial axis
    d = layers.MaxPooling2D(2, padding="same")(layers.ZeroPadding2D(((1, 0), (2, 1)))(c))  # 9x7 -> uneven
    e = layers.AveragePooling2D(2)(c)
    return keras.Model(inp, [layers.GlobalMaxPooling2D()(d), layers.Flatten()(e)], name="pooling")


def merges():
    a_in, b_in = keras.Input((4, 4, 3)), keras.Input((4, 4, 3))
    a = layers.Conv2D(3, 1)(a_in)
    parts = [layers.Add()([a, b_in]), layers.Subtract()([a, b_in]), layers.Multiply()([a, b_in]),
             layers.Average()([a, b_in]), layers.Maximum()([a, b_in]), layers.Minimum()([a, b_in])]
    x = layers.Concatenate()(parts)
    se = layers.Reshape((1, 1, 18))(layers.GlobalAveragePooling2D()(x))  # a squeeze-and-excitation gate
    se = layers.Conv2D(18, 1, activation="sigmoid")(se)
    x = layers.Multiply()([x, se])
    flat = layers.Flatten()(x)
    return keras.Model([a_in, b_in], [layers.Dense(3)(flat), layers.Softmax()(flat)], name="merges")


def sequence():
    x = inp = keras.Input((6,), dtype="int32")
    x = layers.Embedding(20, 8)(x)
    x = layers.Dense(8, activation="leaky_relu")(x)  # Dense on a rank-3 tensor
    x = layers.LayerNormalization(epsilon=1e-5)(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Reshape((12, 4))(x)
    x = layers.Flatten()(x)
    x = layers.BatchNormalization()(x)
    return keras.Model(inp, layers.Dense(4, activation="log_softmax")(x), name="sequence")


ACTIVATIONS = ["relu", "relu6", "sigmoid", "tanh", "softmax", "swish", "silu", "gelu", "hard_sigmoid",
               "hard_swish", "elu", "selu", "linear", "leaky_relu", "softplus", "softsign", "mish"]


def activations():
    inp = keras.Input((10,))
    h = layers.Dense(10)(inp)
    parts = [layers.Activation(name)(h) for name in ACTIVATIONS]
    parts += [layers.LeakyReLU(0.1)(h), layers.ELU(0.5)(h), layers.ReLU(negative_slope=0.2)(h),
              layers.ReLU(max_value=2.5)(h), layers.Softmax(axis=-1)(h)]
    return keras.Model(inp, layers.Concatenate()(parts), name="activations")


def rescale_normalize():
    x = inp = keras.Input((6, 6, 3))
    x = layers.Rescaling(1 / 255.0, offset=-1.0)(x)
    x = layers.Normalization(mean=[0.1, -0.2, 0.3], variance=[0.5, 2.0, 1.5])(x)
    x = layers.Conv2D(4, 3, activation="relu")(x)
    x = layers.Softmax(axis=-1)(x)  # over the channels of a channels-first tensor
    return keras.Model(inp, layers.Reshape((-1,))(x), name="rescale_normalize")


def nested():
    block = keras.Sequential([keras.Input((6, 6, 4)), layers.Conv2D(4, 3, padding="same"),
                              layers.BatchNormalization(), layers.ReLU()], name="block")
    x = inp = keras.Input((6, 6, 4))
    x = layers.Add()([x, block(x)])
    return keras.Model(inp, layers.GlobalAveragePooling2D()(x), name="nested")


def lenet5():
    """The seeds' Keras LeNet-5 (001_fb41b931f88f06a5.txt): two 5x5 convs, max pooling, 120-84-10 Dense."""
    return keras.Sequential([
        keras.Input((28, 28, 1)), layers.Conv2D(6, (5, 5), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Conv2D(16, (5, 5), activation="relu"), layers.MaxPooling2D((2, 2)), layers.Flatten(),
        layers.Dense(120, activation="relu"), layers.Dropout(0.5), layers.Dense(84, activation="relu"),
        layers.Dropout(0.5), layers.Dense(10, activation="softmax")], name="lenet5")


def tiny_resnet():
    x = inp = keras.Input((16, 16, 3))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    for _ in range(2):
        y = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(x)))
        y = layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(y))
        x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    return keras.Model(inp, layers.Dense(10)(layers.GlobalAveragePooling2D()(x)), name="tiny_resnet")


MODELS = [conv2d, conv1d, depthwise_separable, transpose, pooling, merges, sequence, activations,
          rescale_normalize, nested, lenet5, tiny_resnet]


@pytest.mark.parametrize("build", MODELS, ids=lambda f: f.__name__)
def test_layers_convert_and_match_keras(build, tmp_path):
    model = build()
    _randomize_bn(model)
    module = _saved(model, tmp_path)
    assert isinstance(module, (torch.nn.Sequential, torch.fx.GraphModule))
    assert _max_diff(model, module) <= TOL


def test_average_pooling_same_leaves_padding_out_like_tensorflow(tmp_path):
    """An uneven 'same' average (8 -> 4 with 3x3 windows: one padded row at the end) divides by the
    real positions only, as TensorFlow does (Keras's torch backend pads by replication instead)."""
    model = keras.Sequential([keras.Input((8, 8, 2)), layers.AveragePooling2D(3, strides=2, padding="same")])
    module = _saved(model, tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 2)).astype("float32")
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    real = np.pad(np.ones_like(x), ((0, 0), (0, 1), (0, 1), (0, 0)))
    ref = np.zeros((2, 4, 4, 2), np.float32)
    for i in range(4):
        for j in range(4):
            win = (slice(None), slice(2 * i, 2 * i + 3), slice(2 * j, 2 * j + 3))
            ref[:, i, j] = padded[win].sum((1, 2)) / real[win].sum((1, 2))
    assert np.abs(_run_torch(module, [x])[0] - ref).max() <= TOL


def test_lenet5_is_a_plain_sequential_from_keras_and_legacy_h5(tmp_path):
    model = lenet5()
    for suffix in (".keras", ".h5"):
        module = _saved(model, tmp_path, suffix)
        assert isinstance(module, torch.nn.Sequential)
        assert [type(m).__name__ for m in module][:2] == ["Permute", "Conv2d"]  # NHWC in, NCHW convs
        assert _max_diff(model, module) <= TOL
        assert module.zoo_spec["keras"].endswith(suffix)


def test_channels_first_takes_nchw(tmp_path):
    model = lenet5()
    path = tmp_path / "lenet5.keras"
    model.save(path)
    module = load_model(f"keras:{path}?channels_first=true")
    x = _inputs(model)[0]
    got = _run_torch(module, [x.transpose(0, 3, 1, 2).copy()])[0]
    assert np.abs(got - _run_keras(model, [x])[0]).max() <= TOL
    assert module.zoo_spec["kwargs"] == {"channels_first": True}


def test_nhwc_model_on_an_nchw_dataset_is_one_data_error_pointing_at_channels_first(tmp_path):
    from modelpress.core.errors import DataError
    from modelpress.recipes.resolve import resolve_model
    from modelpress.tasks.datasets import load_dataset

    path = tmp_path / "lenet5.keras"
    lenet5().save(path)
    bundle = load_dataset("mnist5k")  # NCHW images
    with pytest.raises(DataError, match="cannot run on inputs of shape") as err:
        resolve_model(str(path), bundle)
    assert "channels_first=true" in err.value.hint
    assert isinstance(resolve_model(f"keras:{path}?channels_first=true", bundle), torch.nn.Module)


def test_mobilenet_v2_converts_and_matches(tmp_path):
    model = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, weights=None, classes=10)
    _randomize_bn(model)
    module = _saved(model, tmp_path)
    assert _max_diff(model, module) <= TOL


@pytest.mark.parametrize("build, shape", [(lenet5, [2, 28, 28, 1]), (tiny_resnet, [2, 16, 16, 3])],
                         ids=["lenet5", "tiny_resnet"])
def test_channel_pruning_shrinks_converted_convs_and_the_artifact_reloads(build, shape, tmp_path):
    model = build()
    module = _saved(model, tmp_path)
    widths = {n: m.out_channels for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    small = modelpress.prune(module, ChannelPruning(ratio=0.5, input_shape=shape))
    pruned = {n: m.out_channels for n, m in small.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert all(pruned[n] <= widths[n] for n in widths) and sum(pruned.values()) < sum(widths.values())
    x = torch.randn(*shape)
    out = small(x)
    assert out.shape == module(x).shape and torch.isfinite(out).all()
    path = tmp_path / "pruned.safetensors"
    save_artifact(small, path)
    again, header = load_artifact(path)
    assert header["source"]["keras"].endswith(f"{model.name}.keras")
    assert torch.allclose(again(x), out, atol=1e-6)


def test_unsupported_layer_is_one_line_naming_it(tmp_path):
    model = keras.Sequential([keras.Input((5, 3)), layers.SimpleRNN(4, name="rnn")], name="rnn_model")
    path = tmp_path / "rnn.keras"
    model.save(path)
    with pytest.raises(UnsupportedError) as err:
        load_model(path)
    assert "'rnn' (SimpleRNN)" in str(err.value) and "\n" not in str(err.value) and err.value.hint


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"\x89HDF\r\n\x1a\n garbage"],
                         ids=["empty", "bad_zip", "bad_hdf5"])
def test_corrupt_file_is_a_model_load_error(content, tmp_path):
    path = tmp_path / ("model.h5" if b"HDF" in content else "model.keras")
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_keras_on_another_backend_is_refused_saying_so(tmp_path, monkeypatch):
    path = tmp_path / "lenet5.keras"
    lenet5().save(path)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ModelLoadError, match="'jax' backend") as err:
        load_model(path)
    assert "KERAS_BACKEND" in err.value.hint


def test_converted_model_quantizes_and_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from modelpress.export.onnx import export_onnx
    from modelpress.quantization.static import StaticInt8

    module = _saved(tiny_resnet(), tmp_path)
    x = torch.randn(8, 16, 16, 3)
    ref = module(x).detach()
    q = modelpress.quantize(module, StaticInt8(), data=[(torch.randn(8, 16, 16, 3), torch.zeros(8).long())] * 2)
    err = (q(x).detach() - ref).pow(2).mean()
    assert 10 * torch.log10(ref.pow(2).mean() / err) > 20  # SQNR in dB
    export_onnx(module, x, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(out - ref.numpy()).max() <= TOL


@pytest.mark.slow  # a CLI process importing keras: ~15 s
def test_cli_evaluates_a_keras_file(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "lenet5.keras"
    lenet5().save(path)
    env = {**os.environ, "MODELPRESS_PROGRESS": "0", "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "modelpress.cli", "evaluate", "-m", f"keras:{path}?channels_first=true",
                          "-d", "digits"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert 0 <= json.loads(res.stdout[res.stdout.index("{"):])["accuracy"] <= 1


# -- Keras out (export/keras.py) --------------------------------------------------------------------
def _randomize(model, seed=2):
    """Random values in every weight (BatchNorm variances positive), so a misplaced one would show."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if ws:
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) if "variance" in v.path else
                               rng.normal(0, 0.5, w.shape).astype(w.dtype) for v, w in zip(layer.weights, ws)])


def _write_back(module, tmp_path, name="back.keras", **kw):
    from modelpress.export.keras import export_keras

    done = export_keras(module, tmp_path / name, **kw)
    return done, keras.saving.load_model(done.path, compile=False)


@pytest.mark.parametrize("build", MODELS, ids=[b.__name__ for b in MODELS])
def test_round_trip_keras_torch_keras_gives_back_the_same_model(build, tmp_path):
    model = build()
    _randomize(model)
    module = _saved(model, tmp_path)
    done, back = _write_back(module, tmp_path)
    xs = _inputs(model)
    for r, g in zip(_run_keras(model, xs), _run_keras(back, xs)):
        assert np.abs(r - g).max() <= TOL * max(1.0, float(np.abs(r).max()))
    assert [w.shape for w in back.get_weights()] == [w.shape for w in model.get_weights()]
    assert done.max_abs_diff <= TOL * 10 and "same widths" in done.note and done.bytes == done.path.stat().st_size


@pytest.mark.parametrize("build, shape", [(lenet5, [2, 28, 28, 1]), (tiny_resnet, [2, 16, 16, 3]),
                                          (depthwise_separable, [2, 8, 8, 3]), (conv2d, [2, 9, 10, 4])],
                         ids=["lenet5", "tiny_resnet", "depthwise_separable", "conv2d"])
def test_channel_pruned_model_is_written_back_narrower_and_computes_the_same(build, shape, tmp_path):
    model = build()
    _randomize(model)
    module = _saved(model, tmp_path)
    xs = _inputs(model)
    small = modelpress.prune(module, ChannelPruning(ratio=0.5, input_shape=shape))
    done, back = _write_back(small, tmp_path)
    assert "narrower" in done.note and done.max_abs_diff <= 1e-4
    assert sum(w.size for w in back.get_weights()) < sum(w.size for w in model.get_weights())
    for r, g in zip(_run_torch(small, xs), _run_keras(back, xs)):
        assert np.abs(r - g).max() <= TOL * max(1.0, float(np.abs(r).max()))


def test_lenet5_channels_first_pruned_sparse_and_int4_goes_back_to_keras(tmp_path):
    """The seeds' LeNet-5 read as NCHW, channel-pruned, 70% sparse and int4 weight-only: the .keras
    file holds the narrower layers with the zeros and the 16 levels per group, and matches."""
    model = lenet5()
    path = tmp_path / "lenet5.keras"
    model.save(path)
    module = load_model(f"keras:{path}?channels_first=true")
    small = modelpress.prune(module, ChannelPruning(ratio=0.5, input_shape=[2, 1, 28, 28]))
    small = modelpress.prune(small, modelpress.MagnitudePruning(sparsity=0.7))
    small = modelpress.quantize(small, modelpress.WeightOnly(bits=4, group_size=16))
    x = torch.rand(4, 1, 28, 28)
    done, back = _write_back(small, tmp_path, example_inputs=x)
    assert done.max_abs_diff <= 1e-5
    dense = back.get_layer(model.layers[5].name).get_weights()[0]
    assert dense.shape[1] < 120 and 0.6 <= float((dense == 0).mean()) <= 0.8
    assert len(np.unique(dense[:16, 0])) <= 16
    with torch.no_grad():
        ref = small(x).numpy()
    assert np.abs(_run_keras(back, [x.permute(0, 2, 3, 1).numpy()])[0] - ref).max() <= 1e-5


def test_keras_write_back_refusals_are_one_line_and_leave_no_file(tmp_path):
    from modelpress.export.keras import export_keras

    model = lenet5()
    path = tmp_path / "lenet5.keras"
    model.save(path)
    module = load_model(path)
    quantized = modelpress.quantize(module, modelpress.StaticInt8(),
                                     data=[torch.rand(4, 28, 28, 1) for _ in range(2)])
    for bad, dest in [(quantized, "q.keras"), (torch.nn.Sequential(torch.nn.Linear(3, 2)), "plain.keras"),
                      (module, "wrong.h5")]:
        with pytest.raises(modelpress.ModelpressError) as err:
            export_keras(bad, tmp_path / dest)
        assert "\n" not in str(err.value) and err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet5.keras"]


def test_cli_prunes_a_keras_file_and_exports_it_back_to_keras(tmp_path):
    """In process (typer's runner): prune channels on keras:FILE, then export -o small.keras."""
    from typer.testing import CliRunner

    from modelpress.cli import app

    path = tmp_path / "lenet5.keras"
    lenet5().save(path)
    runner = CliRunner()
    env = {"MODELPRESS_PROGRESS": "0", "COLUMNS": "200"}
    res = runner.invoke(app, ["prune", "channels", "-m", f"keras:{path}?channels_first=true", "-d", "digits",
                              "-o", str(tmp_path / "run"), "--set", "ratio=0.5", "--finetune", "0", "--no-latency"],
                        env=env)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", "-m", str(tmp_path / "run" / "model.safetensors"), "-d", "digits",
                              "-o", str(tmp_path / "small.keras")], env=env)
    assert res.exit_code == 0, res.output
    assert "narrower" in res.output and "max abs diff" in res.output
    small = keras.saving.load_model(tmp_path / "small.keras", compile=False)
    assert small.layers[2].filters < 16 and small.input_shape == (None, 28, 28, 1)
