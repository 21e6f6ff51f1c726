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


# -- layer kinds of real models (tests/quantization/test_quant_layer_kinds.py, test_prune_layer_kinds.py) --
class TinyEncoder(nn.Module):
    """Linear -> nn.TransformerEncoderLayer -> mean over tokens -> Linear: inputs (batch, 6, 16) floats."""

    def __init__(self, classes=4):
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.enc = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.enc(self.proj(x)).mean(1))


class TinyRNN(nn.Module):
    """Linear -> 2-layer bidirectional LSTM / GRU / RNN -> Linear on the last step: inputs (batch, 5, 8)."""

    def __init__(self, kind="LSTM", classes=4):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.rnn = getattr(nn, kind)(16, 24, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(48, classes)

    def forward(self, x):
        out, _ = self.rnn(self.proj(x))
        return self.head(out[:, -1])


def tiny_gpt2():
    """A 2-layer GPT-2 (32 wide, 100 tokens) returning logits: inputs (batch, tokens) ids."""
    from modelpress.artifact.hf import HFLogits, import_transformers

    transformers = import_transformers()
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return HFLogits(transformers.GPT2LMHeadModel(config))


def lm_loss(model, inputs, target):
    """Next-token style cross-entropy of (batch, tokens, vocab) logits against (batch, tokens) ids."""
    return torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), target.flatten())


def layer_kind_cases():
    """``{name: (build, batches, loss_fn)}``: the models and labelled data of the layer-kind tests."""
    g = torch.Generator().manual_seed(0)

    def floats(shape, classes=4):
        return [(torch.randn(8, *shape, generator=g), torch.randint(0, classes, (8,), generator=g))
                for _ in range(2)]

    tokens = [(torch.randint(0, 100, (4, 8), generator=g), torch.randint(0, 100, (4, 8), generator=g))
              for _ in range(2)]
    return {"encoder": (TinyEncoder, floats((6, 16)), None),
            "lstm": (lambda: TinyRNN("LSTM"), floats((5, 8)), None),
            "gru": (lambda: TinyRNN("GRU"), floats((5, 8)), None),
            "gpt2": (tiny_gpt2, tokens, lm_loss)}
