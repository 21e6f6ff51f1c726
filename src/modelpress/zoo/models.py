"""Built-in models for demos, tests and benchmarks, behind a small timm-style registry.

Every CNN/MLP here takes ``1x28x28`` inputs and predicts 10 classes by default
(``in_channels`` and ``num_classes`` change that). ``build_model`` records how a model was
built in ``model.zoo_spec`` so a checkpoint can store ``{"zoo": name, "kwargs": {...}}``
and rebuild the same architecture later.

Example::

    >>> import torch
    >>> from modelpress.zoo.models import build_model, list_models
    >>> "lenet5" in list_models()
    True
    >>> model = build_model("lenet5")
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> model.zoo_spec
    {'zoo': 'lenet5', 'kwargs': {}}
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from ..artifact.hf import SentenceEncoder
from ..core.errors import ModelLoadError
from ..core.registry import Registry
from .corpora import minilm_path

MODELS: Registry[Callable[..., nn.Module]] = Registry("zoo model", error=ModelLoadError)


def register_model(name: str) -> Callable:
    """Decorator registering a model builder under ``name`` (a builder takes kwargs only)."""
    return MODELS.decorator(name)


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return MODELS.names()


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the zoo model ``name``; the same kwargs always give the same architecture.

    The weights are freshly initialised (except ``minilm``, which loads the bundled
    pretrained weights); seed torch first for identical weights.
    """
    if name not in MODELS:
        raise ModelLoadError(f"unknown zoo model '{name}'",
                             hint=f"available models: {', '.join(list_models())}")
    builder = MODELS.get(name)
    try:  # check the keywords up front so a TypeError inside a builder is not mislabelled
        inspect.signature(builder).bind(**kwargs)
    except TypeError as exc:
        accepted = ", ".join(inspect.signature(builder).parameters)
        raise ModelLoadError(f"cannot build zoo model '{name}' with kwargs {kwargs}: {exc}",
                             hint=f"'{name}' accepts: {accepted}") from exc
    model = builder(**kwargs)
    model.zoo_spec = {"zoo": name, "kwargs": dict(kwargs)}
    return model


def accepted_kwargs(name: str) -> set[str]:
    """Keyword arguments the zoo model ``name`` accepts."""
    if name not in MODELS:
        raise ModelLoadError(f"unknown zoo model '{name}'", hint=f"available models: {', '.join(list_models())}")
    return set(inspect.signature(MODELS.get(name)).parameters)


def _scaled(channels: int, width: float, divisor: int = 4) -> int:
    """Channel count times ``width``, rounded to a multiple of ``divisor`` (MobileNet's rule:
    never drop more than 10% below the exact value)."""
    if width <= 0:
        raise ModelLoadError(f"width must be > 0 (got {width})", hint="use e.g. width=0.5 or 1.0")
    exact = channels * width
    rounded = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * exact:
        rounded += divisor
    return rounded


# -- LeNet ------------------------------------------------------------------------------
class LeNet5(nn.Module):
    """LeNet-5 (as in the Deep Compression paper) for 1x28x28 inputs.

    61,706 parameters and 416,520 multiply-accumulates per image:
    conv1 6*28*28*25 = 117,600; conv2 16*10*10*150 = 240,000;
    fc1 400*120 = 48,000; fc2 120*84 = 10,080; fc3 84*10 = 840.
    ``image_size`` (default 28) only changes fc1's input width (e.g. 576 for 32x32).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)  # 28x28 -> 28x28, pool -> 14x14
        self.conv2 = nn.Conv2d(6, 16, 5)                      # 14x14 -> 10x10, pool -> 5x5
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        side = (image_size // 2 - 4) // 2
        if side < 1:
            raise ModelLoadError(f"lenet5 needs image_size >= 12 (got {image_size})")
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class LeNet300(nn.Module):
    """LeNet-300-100 MLP: 784 -> 300 -> 100 -> 10 with ReLU; 266,610 parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


@register_model("lenet300")
def lenet300(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return LeNet300(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


# -- ResNet -----------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 conv+BN with a residual add; a 1x1 conv+BN projects the shortcut when the
    stride or width changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetSmall(nn.Module):
    """A CIFAR-style ResNet shrunk for 28x28: stem 3x3 conv, three stages of basic blocks
    (16, 32, 64 channels times ``width``; strides 1, 2, 2), global average pool, fc.

    With one block per stage: 9 convs (stem + 6 3x3 + 2 1x1 shortcuts), 77,754 parameters
    at width 1.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
                 blocks: int = 1):
        super().__init__()
        chans = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.relu = nn.ReLU()
        stages, in_ch = [], chans[0]
        for out_ch, stride in zip(chans, (1, 2, 2)):
            layers = [BasicBlock(in_ch, out_ch, stride)]
            layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("resnet_small")
def resnet_small(num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
                 blocks: int = 1) -> nn.Module:
    """``width`` scales every stage's channels; ``blocks`` is the number of blocks per stage."""
    if blocks < 1:
        raise ModelLoadError(f"resnet_small: blocks must be >= 1 (got {blocks})")
    return ResNetSmall(num_classes=num_classes, in_channels=in_channels, width=width, blocks=blocks)


# -- MobileNetV2 ------------------------------------------------------------------------
def _conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch), nn.ReLU6())


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when ``expand == 1``) -> 3x3 depthwise -> 1x1 linear project;
    residual add when the stride is 1 and the width is unchanged."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        layers = [] if expand == 1 else [_conv_bn_relu6(in_ch, hidden, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper
MOBILENET_SMALL_CONFIG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2))


class MobileNetV2Small(nn.Module):
    """MobileNetV2-style network for 28x28: stem 3x3 conv (16 ch), inverted residual
    blocks from :data:`MOBILENET_SMALL_CONFIG`, 1x1 head conv (128 ch), pool, classifier.
    All widths are scaled by ``width``; 32,234 parameters at width 1."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        stem_ch, head_ch = _scaled(16, width), _scaled(128, width)
        layers, in_ch = [_conv_bn_relu6(in_channels, stem_ch, 3)], stem_ch
        for t, c, n, s in MOBILENET_SMALL_CONFIG:
            out_ch = _scaled(c, width)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(_conv_bn_relu6(in_ch, head_ch, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model("mobilenetv2_small")
def mobilenetv2_small(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> nn.Module:
    return MobileNetV2Small(num_classes=num_classes, in_channels=in_channels, width=width)


# -- MiniLM (transformers is imported when it is built, so torch-only users never import it) ----------
@register_model("minilm")
def minilm(path: str | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 sentence encoder from the bundled weights (or any local HF dir)."""
    return SentenceEncoder.from_pretrained(path if path is not None else minilm_path())

