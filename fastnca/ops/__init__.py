"""Public fastnca ops: device dispatch (Triton on CUDA, fusable composites elsewhere) + autograd."""

from fastnca.ops.gram import StyleLoss, gram, style_loss
from fastnca.ops.nca_step import nca_step
from fastnca.ops.perceive import Perception, perceive

__all__ = ["Perception", "StyleLoss", "gram", "nca_step", "perceive", "style_loss"]
