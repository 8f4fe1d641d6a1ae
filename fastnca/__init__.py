"""fastnca: fast Neural Cellular Automata and neural-style losses in PyTorch."""

from fastnca.losses import content_loss, overflow_loss, sliced_wasserstein_loss
from fastnca.nca.model import NCA
from fastnca.ops import Perception, StyleLoss, gram, nca_step, perceive, style_loss
from fastnca.reference import DEFAULT_FILTERS, DISTILL_FILTERS

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_FILTERS",
    "DISTILL_FILTERS",
    "NCA",
    "Perception",
    "StyleLoss",
    "content_loss",
    "gram",
    "nca_step",
    "overflow_loss",
    "perceive",
    "sliced_wasserstein_loss",
    "style_loss",
]
