"""Built-in models and datasets for demos, tests and benchmarks.

Example::

    >>> from modelpress.zoo import build_model, load_dataset
    >>> model = build_model("lenet5")
    >>> data = load_dataset("mnist5k")

Sentence-embedding helpers (MiniLM, graded pairs) live in :mod:`modelpress.zoo.text`,
which needs the ``[nlp]`` extra; importing this package never imports transformers.
"""
from .datasets import DatasetBundle, list_datasets, load_dataset
from .models import build_model, list_models, register_model

__all__ = ["DatasetBundle", "build_model", "list_datasets", "list_models", "load_dataset",
           "register_model"]
