"""The evaluation harness: train target networks with and without MetaPerturb, and against
other regularizers, and record what each is worth (``metaperturb eval``,
``benchmarks/transfer.py``)."""

from ..stopping import stop_on_signals
from .calibration import calibration
from .config import TransferConfig, run_id
from .regularizers import DropBlock, ManifoldMixup
from .reuse import find_equivalent_result
from .run import TransferRun, run_transfer
from .targets import PRESETS, Target, load_target, resolve_target

__all__ = [
    "PRESETS",
    "DropBlock",
    "ManifoldMixup",
    "Target",
    "TransferConfig",
    "TransferRun",
    "calibration",
    "find_equivalent_result",
    "load_target",
    "resolve_target",
    "run_id",
    "run_transfer",
    "stop_on_signals",
]
