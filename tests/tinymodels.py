"""Tiny models shared by tests (import as ``from tinymodels import TinyMLP``: a module name of its
own, because two conftest.py files make ``from conftest import ...`` pick either)."""
import torch
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self, d_in=16, hidden=32, classes=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))
