"""MetaPerturb: a meta-learned perturbation regularizer for any PyTorch CNN, in one line.

Example:
    >>> import timm, metaperturb
    >>> model = metaperturb.wrap(timm.create_model("resnet18", num_classes=10))  # doctest: +SKIP
"""

from . import models as models
from ._version import __version__ as __version__
from .annealing import StrengthScheduler as StrengthScheduler
from .annealing import linear_ramp as linear_ramp
from .diagnostics import ClosedSiteWarning as ClosedSiteWarning
from .diagnostics import channel_scales as channel_scales
from .discovery import PlannedSite as PlannedSite
from .discovery import SitePlan as SitePlan
from .discovery import SkippedModule as SkippedModule
from .errors import AlreadyWrappedError as AlreadyWrappedError
from .errors import DefaultPhiUnavailableError as DefaultPhiUnavailableError
from .errors import MetaPerturbError as MetaPerturbError
from .errors import NoSitesError as NoSitesError
from .errors import NotWrappedError as NotWrappedError
from .errors import PhiFormatError as PhiFormatError
from .errors import PhiNotFoundError as PhiNotFoundError
from .evaluation import mc_predict as mc_predict
from .evaluation import update_bn as update_bn
from .phi import Perturbation as Perturbation
from .phi import PerturbationConfig as PerturbationConfig
from .wrapper import MetaPerturb as MetaPerturb
from .wrapper import disabled as disabled
from .wrapper import exclude_sites as exclude_sites
from .wrapper import get_controller as get_controller
from .wrapper import inspect as inspect
from .wrapper import is_wrapped as is_wrapped
from .wrapper import set_eval_mode as set_eval_mode
from .wrapper import set_strength as set_strength
from .wrapper import unwrap as unwrap
from .wrapper import wrap as wrap

__all__ = [
    "AlreadyWrappedError",
    "ClosedSiteWarning",
    "DefaultPhiUnavailableError",
    "MetaPerturb",
    "MetaPerturbError",
    "NoSitesError",
    "NotWrappedError",
    "Perturbation",
    "PerturbationConfig",
    "PhiFormatError",
    "PhiNotFoundError",
    "PlannedSite",
    "SitePlan",
    "SkippedModule",
    "StrengthScheduler",
    "__version__",
    "channel_scales",
    "disabled",
    "exclude_sites",
    "get_controller",
    "inspect",
    "is_wrapped",
    "linear_ramp",
    "mc_predict",
    "models",
    "set_eval_mode",
    "set_strength",
    "unwrap",
    "update_bn",
    "wrap",
]
