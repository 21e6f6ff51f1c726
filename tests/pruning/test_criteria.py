import pytest
import torch
from torch import nn

from modelpress import MagnitudePruning, Polynomial, Scope, TrainConfig, prune
from modelpress.core.errors import DataError
from modelpress.engine import MethodInputs, run_method
from modelpress.pruning.criteria import RandomPruning, SNIPPruning, TaylorPruning, snip_scores, taylor_scores


def zeros(t):
    return int((t == 0).sum())


def labelled(n=256, d=16, classes=4, dead_feature=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    if dead_feature is not None:
        x[:, dead_feature] = 0.0  # e.g. a constant-zero pixel: the weights reading it get no gradient
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]


CONFIGS = {
    "l1": lambda **kw: MagnitudePruning(norm="l1", **kw),
    "l2": lambda **kw: MagnitudePruning(norm="l2", **kw),
    "random": lambda **kw: RandomPruning(seed=3, **kw),
    "taylor": lambda **kw: TaylorPruning(batches=2, **kw),
    "snip": lambda **kw: SNIPPruning(**kw),
}


@pytest.mark.parametrize("criterion", sorted(CONFIGS))
@pytest.mark.parametrize("ranking", ["global", "layer"])
def test_every_criterion_reaches_exact_sparsity(tiny_mlp, criterion, ranking):
    p = prune(tiny_mlp, CONFIGS[criterion](sparsity=0.7, ranking=ranking, keep_first_last=False), labelled())
    layers = (p.fc1, p.fc2, p.fc3)
    if ranking == "layer":
        for m in layers:
            assert zeros(m.weight) == round(0.7 * m.weight.numel())
    else:
        assert sum(zeros(m.weight) for m in layers) == round(0.7 * sum(m.weight.numel() for m in layers))
    assert zeros(tiny_mlp.fc2.weight) == 0  # a copy was pruned


@pytest.mark.parametrize("cfg_cls", [TaylorPruning, SNIPPruning])
def test_gradient_criteria_prune_weights_reading_a_dead_input_first(cfg_cls):
    torch.manual_seed(1)  # a fresh init: SNIP's use case
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    data = labelled(dead_feature=5)
    # Exactly as many weights as read feature 5 (one column of the first layer).
    p = prune(model, cfg_cls(sparsity=32 / 512, ranking="layer", scope=Scope(include=["0"])), data)
    pruned = p[0].weight == 0
    assert pruned[:, 5].all() and int(pruned.sum()) == 32


def test_taylor_sums_absolute_saliency_per_batch_while_snip_sums_gradients_first():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    layers = [("0", model[0])]
    # loss = target * output: batch 1 pushes w0 up, batch 2 down by the same amount.
    data = [(torch.tensor([[1.0, 1.0]]), torch.tensor([1.0])), (torch.tensor([[1.0, 0.0]]), torch.tensor([-1.0]))]
    loss_fn = lambda m, x, t: (m(x).squeeze(1) * t).sum()  # noqa: E731
    taylor = taylor_scores(model, layers, data, loss_fn=loss_fn, batches=2)["0"]
    snip = snip_scores(model, layers, data, loss_fn=loss_fn, batches=2)["0"]
    assert taylor.tolist() == [[2.0, 1.0]]  # |+1| + |-1| for w0, 1 for w1
    assert snip.tolist() == [[0.0, 1.0]]    # the gradients of w0 cancel
    assert model[0].weight.grad is None    # scoring never touches .grad


def test_random_is_seeded_exact_and_spread_over_layers(tiny_mlp):
    cfg = RandomPruning(sparsity=0.6, seed=7, keep_first_last=False)
    a, b = prune(tiny_mlp, cfg), prune(tiny_mlp, cfg)
    c = prune(tiny_mlp, RandomPruning(sparsity=0.6, seed=8, keep_first_last=False))
    assert torch.equal(a.fc2.weight == 0, b.fc2.weight == 0)
    assert not torch.equal(a.fc2.weight == 0, c.fc2.weight == 0)
    total = sum(m.weight.numel() for m in (a.fc1, a.fc2, a.fc3))
    assert sum(zeros(m.weight) for m in (a.fc1, a.fc2, a.fc3)) == round(0.6 * total)
    for m in (a.fc1, a.fc2):  # global random ranking: every big layer near the target
        assert abs(zeros(m.weight) / m.weight.numel() - 0.6) < 0.06


def test_shared_scope_and_overrides_work_for_other_criteria(tiny_mlp):
    p = prune(tiny_mlp, RandomPruning(sparsity=0.5, layer_sparsity={"fc2": 0.25}))
    assert zeros(p.fc1.weight) == 0 and zeros(p.fc3.weight) == 0  # first/last excluded by default
    assert zeros(p.fc2.weight) == 256
    p = prune(tiny_mlp, TaylorPruning(sparsity=0.5, scope=Scope(include=["fc1", "fc3"])), labelled())
    assert zeros(p.fc2.weight) == 0
    assert zeros(p.fc1.weight) + zeros(p.fc3.weight) == round(0.5 * (512 + 128))


def test_taylor_and_snip_need_data(tiny_mlp):
    for cfg in (TaylorPruning(), SNIPPruning()):
        with pytest.raises(DataError, match="needs data"):
            prune(tiny_mlp, cfg)
    with pytest.raises(DataError, match="needs? data"):  # the scorer's own message: "... needs data (...)"
        taylor_scores(tiny_mlp, [("fc2", tiny_mlp.fc2)], None)
    with pytest.raises(DataError, match="labelled"):
        prune(tiny_mlp, TaylorPruning(), [torch.randn(8, 16)])  # inputs without targets


def test_scheduled_taylor_prunes_while_fine_tuning_and_keeps_masks(tiny_mlp, toy_data):
    train, _ = toy_data
    cfg = TaylorPruning(sparsity=0.8, batches=2, schedule=Polynomial(frequency=2), keep_first_last=False)
    p, report = run_method(tiny_mlp, cfg,
                           MethodInputs(data=train, train=TrainConfig(epochs=3, lr=0.01, optimizer="sgd")))
    assert report.trained and len(report.info["schedule"]) >= 3
    total = sum(m.weight.numel() for m in (p.fc1, p.fc2, p.fc3))
    assert sum(zeros(m.weight) for m in (p.fc1, p.fc2, p.fc3)) == round(0.8 * total)


def test_already_pruned_weights_stay_pruned_when_a_criterion_scores_others_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    first = prune(model, MagnitudePruning(sparsity=0.25, ranking="layer", scope=Scope(include=["0"])))
    before = first[0].weight == 0
    # Taylor scores the dead feature's column 0 as well: earlier zeros must still win the ranking.
    again = prune(first, TaylorPruning(sparsity=0.5, ranking="layer", scope=Scope(include=["0"])),
                  labelled(dead_feature=5))
    after = again[0].weight == 0
    assert after[before].all() and int(after.sum()) == 256
