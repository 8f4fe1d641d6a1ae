"""fastnca: fast Neural Cellular Automata and neural-style losses in PyTorch."""

from fastnca.losses import content_loss, overflow_loss, sliced_wasserstein_loss
from fastnca.ops import Perception, StyleLoss, gram, perceive, style_loss
from fastnca.reference import DEFAULT_FILTERS, DISTILL_FILTERS

__version__ = "0.1.0"
__all__ = ["DEFAULT_FILTERS", "DISTILL_FILTERS", "Perception", "StyleLoss", "content_loss", "gram",
           "overflow_loss", "perceive", "sliced_wasserstein_loss", "style_loss"]
