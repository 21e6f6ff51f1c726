"""Built-in models and datasets for demos, tests and benchmarks.

The zoo plugs into the registries the rest of modelpress defines: its model names are a
model source (``modelpress.artifact.loading.SOURCES``, in :mod:`.baselines`: a zoo name on
labelled data means its cached trained baseline), its datasets and the readers of the user's
files are datasets (:mod:`modelpress.tasks.datasets`). Nothing else in modelpress imports it.

Example::

    >>> from modelpress.zoo import build_model, load_dataset
    >>> model = build_model("lenet5")
    >>> data = load_dataset("mnist5k")

MiniLM and the bundled sentence data live in :mod:`modelpress.zoo.corpora` (the ``[nlp]``
extra for MiniLM); importing this package never imports transformers.
"""
from . import baselines  # noqa: F401  (registers the zoo as a model source)
from .datasets import DatasetBundle, list_datasets, load_dataset
from .models import build_model, list_models, register_model

__all__ = ["DatasetBundle", "build_model", "list_datasets", "list_models", "load_dataset",
           "register_model"]
