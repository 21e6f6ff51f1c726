"""Self-distillation (``distill.self``): the network's deepest output teaches classifier heads
attached to its shallower layers (Zhang et al. 2019, "Be Your Own Teacher").

Training adds one small *exit* head per chosen layer (a 4-D feature map gets 3x3 conv + BN +
ReLU, global average pooling and a Linear; a token sequence ``(B, N, C)`` gets the token mean,
LayerNorm and a Linear; a vector a Linear). The loss, with final logits ``z`` and exit logits
``e_i`` over ``n`` exits::

    CE(z, y) + 1/n * sum_i [ (1 - alpha) * CE(e_i, y) + alpha * T**2 * KL(softmax(z/T) || softmax(e_i/T)) ]

The final output is the teacher (detached in the KL term, so it learns from the labels only);
the exits' gradients flow back into the shared layers, which is what regularises the network.
The heads are dropped after training: the returned model has the original architecture and
size (``info["exits"]`` lists the layers used, ``info["head_params"]`` the parameters
the heads added during training only).

``exits`` names the layers; by default up to ``num_exits`` are chosen evenly among the
parameterised top-level blocks whose output is a feature (the block feeding the classifier
and the classifier itself excluded).

    >>> import torch
    >>> from torch import nn
    >>> from modelpress import distill, TrainConfig
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> x = torch.randn(64, 8); y = x[:, :3].argmax(1)
    >>> out = distill(net, SelfDistillation(exits=["0"]), [(x, y)], train=TrainConfig(epochs=2))
    >>> [type(m).__name__ for m in out]  # the architecture is unchanged
    ['Linear', 'ReLU', 'Linear', 'ReLU', 'Linear']
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.config import MethodConfig
from ..core.data import call_model, split_batch
from ..core.errors import ConfigError, DataError
from ..core.training import TrainConfig
from ..engine import MethodInputs, MethodResult, register_method
from .kd import _FeatureTaps, _output
from .losses import kd_loss


class SelfDistillation(MethodConfig):
    """Self-distillation: the final output teaches exit heads on shallower layers (heads dropped after)."""

    exits: list[str] | None = Field(None, description="layers to attach exit heads to (default: automatic)")
    num_exits: int = Field(3, ge=1, le=16, description="how many exits the automatic choice picks")
    T: float = Field(3.0, gt=0, description="temperature of the final -> exit soft targets")
    alpha: float = Field(0.5, ge=0, le=1, description="exit loss: alpha * KD + (1 - alpha) * CE")


class ExitHead(nn.Module):
    """A small classifier on an intermediate feature (4-D map, token sequence or vector)."""

    def __init__(self, feature: torch.Tensor, num_classes: int):
        super().__init__()
        if feature.dim() == 4:
            c = feature.shape[1]
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
        elif feature.dim() == 3:
            self.body = nn.Sequential(_TokenMean(), nn.LayerNorm(feature.shape[-1]),
                                      nn.Linear(feature.shape[-1], num_classes))
        elif feature.dim() == 2:
            self.body = nn.Linear(feature.shape[1], num_classes)
        else:
            raise DataError(f"distill.self: cannot attach an exit to a feature of shape {tuple(feature.shape)}",
                            hint="choose layers whose output is (B, C), (B, N, C) or (B, C, H, W)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class _WithExits(nn.Module):
    """What ``fit`` trains: the model and its exit heads (forward = the model's)."""

    def __init__(self, model: nn.Module, heads: list[nn.Module]):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleList(heads)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _probe(model: nn.Module, inputs: Any, names: list[str],
           strict: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Outputs of ``names`` and of the model on one batch (eval mode, no grad)."""
    taps = _FeatureTaps(model, names, "model", strict=strict)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _output(call_model(model, inputs))
    finally:
        model.train(was_training)
        taps.remove()
    return taps.features, out


def _block_list(model: nn.Module) -> list[str]:
    """The children of the longest ``nn.Sequential`` / ``nn.ModuleList`` of blocks with parameters
    (torchvision's ``features``, timm's ``blocks``, a transformer's ``encoder.layer``), or []."""
    best: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Sequential, nn.ModuleList)):
            kids = [".".join(filter(None, (name, n))) for n, c in m.named_children()
                    if any(True for _ in c.parameters())]
            if len(kids) >= 2 and len(kids) > len(best):
                best = kids
    return best


def auto_exits(model: nn.Module, inputs: Any, num_exits: int) -> list[str]:
    """Up to ``num_exits`` blocks (evenly spaced) whose output is a feature, not the logits: the
    top-level blocks (ResNet's layer1..layer4), else the blocks of the model's longest block list."""
    candidates: list[str] = []
    for names in ([n for n, c in model.named_children() if any(True for _ in c.parameters())], _block_list(model)):
        feats, out = _probe(model, inputs, names, strict=False)
        if out.dim() != 2:
            raise DataError(f"distill.self expects classifier logits (B, classes), the model returned "
                            f"{tuple(out.shape)}", hint="self-distillation trains classification exits")
        candidates = [n for n in names if n in feats and feats[n].dim() in (2, 3, 4)
                      and feats[n].shape[0] == out.shape[0]
                      and not (feats[n].dim() == 2 and feats[n].shape == out.shape)]
        candidates = candidates[:-1]  # the block feeding the classifier adds nothing over the final output
        if candidates:
            break
    if not candidates:
        raise ConfigError("distill.self: found no layer to attach an exit head to",
                          hint="name the layers with SelfDistillation(exits=['layer1', ...])")
    if len(candidates) <= num_exits:
        return candidates
    step = len(candidates) / num_exits
    return [candidates[int(i * step)] for i in range(num_exits)]


@register_method("distill.self", SelfDistillation, needs_data=True, needs_training=True,
                 layer_types=())
def self_distillation(model: nn.Module, cfg: SelfDistillation, inputs: MethodInputs) -> MethodResult:
    """Self-distillation (Be Your Own Teacher): exit heads on shallower layers learn from the final output."""
    if inputs.data is None:
        raise DataError("distill.self needs labelled training data", hint="pass data=...")
    train = inputs.train or TrainConfig()
    example, target = split_batch(next(iter(inputs.training_data(train))))
    if target is None:
        raise DataError("distill.self needs labels (the final output learns from them)",
                        hint="pass (inputs, target) batches")
    names = cfg.exits or auto_exits(model, example, cfg.num_exits)
    feats, out = _probe(model, example, names)
    if out.dim() != 2:
        raise DataError(f"distill.self expects classifier logits (B, classes), the model returned {tuple(out.shape)}")
    missing = [n for n in names if n not in feats]
    if missing:
        raise ConfigError(f"distill.self: the layers {missing} did not run in the forward pass",
                          hint="choose layers that the model's forward calls")
    heads = [ExitHead(feats[n], out.shape[1]) for n in names]
    taps = _FeatureTaps(model, names, "model")

    def loss_fn(wrapped: _WithExits, x: Any, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            raise DataError("distill.self: a batch without labels", hint="every batch needs (inputs, target)")
        z = _output(call_model(wrapped.model, x))
        loss = F.cross_entropy(z, y)
        teacher = z.detach()
        exit_loss = 0.0
        for name, head in zip(names, wrapped.heads):
            e = head(taps.take(name, "model"))
            exit_loss = exit_loss + (1 - cfg.alpha) * F.cross_entropy(e, y) + cfg.alpha * kd_loss(e, teacher, cfg.T)
        return loss + exit_loss / len(names)

    try:
        inputs.fit(_WithExits(model, heads), "self-distillation", train=train, loss_fn=loss_fn)
    finally:
        taps.remove()
    return MethodResult(model, {"exits": names, "head_params": sum(p.numel() for h in heads for p in h.parameters())},
                        trained=True)
