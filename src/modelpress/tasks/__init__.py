"""Tasks (what a model is for: loss, quality metric, example inputs) and datasets by name."""
from .base import DatasetBundle, Task
from .classification import Classification
from .datasets import list_datasets, load_dataset, register_dataset
from .embedding import SentenceEmbedding
from .language_modelling import LanguageModelling, TokenBlocks

__all__ = ["Classification", "DatasetBundle", "LanguageModelling", "SentenceEmbedding", "Task", "TokenBlocks",
           "list_datasets", "load_dataset", "register_dataset"]
