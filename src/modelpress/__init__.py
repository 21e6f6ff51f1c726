"""modelpress: make trained PyTorch models smaller and faster, and measure it."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("modelpress")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

from .api import apply, compress, distill, factorize, prune, quantize  # noqa: E402
from .core.config import MethodConfig  # noqa: E402
from .core.data import Data  # noqa: E402
from .core.errors import ModelpressError  # noqa: E402
from .core.registry import get_method, list_methods  # noqa: E402
from .core.scope import Scope  # noqa: E402
from .core.training import TrainConfig  # noqa: E402
from .pruning.magnitude import MagnitudePruning  # noqa: E402
from .pruning.schedules import Constant, OneShot, Polynomial  # noqa: E402

__all__ = [
    "apply", "compress", "distill", "factorize", "prune", "quantize",
    "Data", "MethodConfig", "ModelpressError", "Scope", "TrainConfig",
    "get_method", "list_methods",
    "MagnitudePruning", "OneShot", "Constant", "Polynomial",
]
