"""Neural Cellular Automata: the model, presets, training recipe, run directories, checkpoints,
rendering.

``model`` (NCA), ``config`` (presets and the run configuration, defined once), ``recipe`` (the
pool-training callback and the texture loss), ``run`` (``train_texture`` and run directories),
``checkpoint`` (the NCA file format), ``render`` (growth animations).
"""

from fastnca.nca.checkpoint import load_checkpoint, load_nca, save_checkpoint
from fastnca.nca.distill import import_distill
from fastnca.nca.model import NCA
from fastnca.nca.render import grow, render
from fastnca.nca.run import train_texture

__all__ = [
    "NCA",
    "grow",
    "import_distill",
    "load_checkpoint",
    "load_nca",
    "render",
    "save_checkpoint",
    "train_texture",
]
