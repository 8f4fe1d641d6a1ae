"""fastnca: fast Neural Cellular Automata and neural-style losses in PyTorch."""

from fastnca.ops import Perception, perceive
from fastnca.reference import DEFAULT_FILTERS, DISTILL_FILTERS

__version__ = "0.1.0"
__all__ = ["DEFAULT_FILTERS", "DISTILL_FILTERS", "Perception", "perceive"]
