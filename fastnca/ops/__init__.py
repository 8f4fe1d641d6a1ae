"""Public fastnca ops: device dispatch (Triton on CUDA, fusable composites elsewhere) + autograd."""

from fastnca.ops.gram import StyleLoss, gram, style_loss
from fastnca.ops.perceive import Perception, perceive

__all__ = ["Perception", "StyleLoss", "gram", "perceive", "style_loss"]
