"""Public fastnca ops: device dispatch (Triton on CUDA, fusable composites elsewhere) + autograd."""

from fastnca.ops.perceive import Perception, perceive

__all__ = ["Perception", "perceive"]
