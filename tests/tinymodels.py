"""Tiny models and data shared by tests (import as ``from tinymodels import TinyMLP``: a module name of its
own, because two conftest.py files make ``from conftest import ...`` pick either)."""
import torch
from torch import nn
from torch.utils.data import TensorDataset


class TinyMLP(nn.Module):
    def __init__(self, d_in=16, hidden=32, classes=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def toy_bundle():
    """600 random 16-d points labelled by a random linear map into 4 classes (500 train, 100 test)."""
    from modelpress.tasks import Classification
    from modelpress.zoo.datasets import DatasetBundle

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    return DatasetBundle(name="toy", train=TensorDataset(x[:500], y[:500]), test=TensorDataset(x[500:], y[500:]),
                         task=Classification(), num_classes=4, input_shape=(16,), meta={})
