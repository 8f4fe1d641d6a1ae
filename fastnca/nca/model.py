"""The NCA module (a drop-in for the lesson's ``SimpleCA``), its presets, seeding, and the lesson's
own module and a saved-bytes counter for baselines.

    model = NCA.texture()                  # 12 channels, 96 hidden, Distill filters
    x = model.seed(4, 128)                 # (4, 12, 128, 128) zeros
    x = model(x, steps=64)                 # 64 fused updates (fastnca.ops.nca_step)
    img = model.to_rgb(x)                  # (4, 3, 128, 128) in [0, 1]

Parameters live in the lesson's layout: ``w1`` = Conv2d(F*C, hidden, 1) (with bias), ``w2`` =
Conv2d(hidden, C, 1, bias=False), zero-initialised. So ``NCA.load_state_dict`` takes a ``SimpleCA``
state dict as it is, and ``NCA.from_lesson_state_dict`` builds the matching module from one.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fastnca.nca.config import architecture
from fastnca.ops.nca_step import nca_step
from fastnca.ops.nca_step_options import check_options
from fastnca.reference import CLIP_KEYS, DEFAULT_FILTERS

DISPLAYS = ("rgb", "rgb/2", "premultiplied")

_LESSON_KEYS = ("w1.weight", "w2.weight")


class NCA(nn.Module):
    """Neural Cellular Automaton: per step, perception (fixed 3x3 filters, circular), a per-cell MLP
    ``w2 relu(w1 p + b1)``, a random update mask (rate ``fire_rate``) and a residual update.

    Args:
        channels: state channels C (the first three are RGB for ``to_rgb``).
        hidden: hidden units of the per-cell MLP.
        fire_rate: probability that a cell updates at each step, in [0, 1].
        filters: (F, 3, 3) perception bank (default ``DEFAULT_FILTERS``, the lesson's), held as a
            buffer (saved in the state dict; a state dict without it keeps the module's own).
        bias1, bias2: biases of the first / last layer (the lesson: True, False).
        zero_init: zero the last layer, so a new model leaves its state unchanged (the lesson).

    Step options (keyword-only; the defaults are the lesson's step, see ``fastnca.ops.nca_step``):
        padding: "circular" or "zeros" (the growing NCA).
        alive_threshold, alive_channel: alive masking on ``x[:, alive_channel]`` (growing: 0.1, 3).
        clip: None or {"perception"|"hidden"|"update"|"state": (lo, hi)} (the Distill textures).
        perception_angle: rotation of the two gradient filters, in radians.
        display: how ``image`` shows a state: "rgb" (``x[:3] + 0.5``), "rgb/2" (``x[:3] / 2 +
            0.5``, the Distill textures) or "premultiplied" (RGBA on white); None: "premultiplied"
            with alive masking, else "rgb".
    They are stored in checkpoints (``step_options()``); with alive masking ``seed`` grows from
    one living cell.
    """

    def __init__(
        self,
        channels: int = 4,
        hidden: int = 8,
        fire_rate: float = 0.5,
        filters: torch.Tensor | None = None,
        bias1: bool = True,
        bias2: bool = False,
        zero_init: bool = True,
        *,
        padding: str = "circular",
        alive_threshold: float | None = None,
        alive_channel: int = 3,
        clip: dict | None = None,
        perception_angle: float = 0.0,
        display: str | None = None,
    ):
        super().__init__()
        for name, v in (("channels", channels), ("hidden", hidden)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        bank = DEFAULT_FILTERS if filters is None else torch.as_tensor(filters)
        if bank.dim() != 3 or tuple(bank.shape[1:]) != (3, 3) or bank.shape[0] < 1:
            raise ValueError(f"filters must have shape (F, 3, 3), got {tuple(bank.shape)}")
        self.channels, self.hidden = int(channels), int(hidden)
        self.fire_rate = fire_rate
        _, thr, ch, _, angle = check_options(
            padding,
            alive_threshold,
            alive_channel,
            clip,
            perception_angle,
            self.channels,
            bank.shape[0],
        )
        self.padding, self.alive_threshold, self.alive_channel = padding, thr, ch
        self.perception_angle = angle
        self.clip = (
            None
            if not clip
            else {
                k: tuple(None if v is None else float(v) for v in clip[k])
                for k in CLIP_KEYS
                if clip.get(k) is not None
            }
            or None
        )
        if display is None:
            display = "rgb" if thr is None else "premultiplied"
        if display not in DISPLAYS:
            raise ValueError(f"display must be one of {DISPLAYS} or None, got {display!r}")
        self.display = display
        self.register_buffer("filters", bank.detach().clone().float())
        self.w1 = nn.Conv2d(channels * bank.shape[0], hidden, 1, bias=bias1)
        self.w2 = nn.Conv2d(hidden, channels, 1, bias=bias2)
        if zero_init:
            nn.init.zeros_(self.w2.weight)
            if bias2:
                nn.init.zeros_(self.w2.bias)

    @property
    def fire_rate(self) -> float:
        return self._fire_rate

    @fire_rate.setter
    def fire_rate(self, value: float) -> None:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
            raise ValueError(f"fire_rate must be a number in [0, 1], got {value!r}")
        self._fire_rate = float(value)

    @classmethod
    def fastai(cls, **kwargs) -> NCA:
        """The lesson's model: 4 channels, 8 hidden, unscaled filters (``DEFAULT_FILTERS``)."""
        return cls(**{**architecture("lesson"), **kwargs})

    @classmethod
    def texture(cls, **kwargs) -> NCA:
        """Self-Organising Textures: 12 channels, 96 hidden, ``DISTILL_FILTERS``."""
        return cls(**{**architecture("texture"), **kwargs})

    @classmethod
    def from_lesson_state_dict(
        cls, state_dict: dict, fire_rate: float = 0.5, filters: torch.Tensor | None = None
    ) -> NCA:
        """The NCA holding a lesson ``SimpleCA`` state dict: ``w1.weight`` (hidden, F*C, 1, 1),
        optional ``w1.bias`` (hidden,), ``w2.weight`` (C, hidden, 1, 1), optional ``w2.bias``.
        Sizes are read from the shapes; ``filters`` defaults to the lesson's bank (F = 4).
        """
        missing = [k for k in _LESSON_KEYS if k not in state_dict]
        if missing:
            raise KeyError(f"lesson state dict lacks {missing}; it has {sorted(state_dict)}")
        w1 = state_dict["w1.weight"].reshape(state_dict["w1.weight"].shape[0], -1)
        w2 = state_dict["w2.weight"].reshape(state_dict["w2.weight"].shape[0], -1)
        hidden, channels = w1.shape[0], w2.shape[0]
        bank = DEFAULT_FILTERS if filters is None else torch.as_tensor(filters)
        if w2.shape[1] != hidden or w1.shape[1] != channels * bank.shape[0]:
            raise ValueError(
                f"lesson state dict shapes do not fit: w1.weight {tuple(w1.shape)}, "
                f"w2.weight {tuple(w2.shape)} with {bank.shape[0]} filters; expected "
                f"(hidden, C*F) and (C, hidden)"
            )
        model = cls(
            channels,
            hidden,
            fire_rate,
            bank,
            bias1="w1.bias" in state_dict,
            bias2="w2.bias" in state_dict,
        )
        sd = {k: v for k, v in state_dict.items() if k != "filters"}
        model.load_state_dict(sd)
        return model

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Lesson state dicts have no filters: keep the module's. 2-D weights get the conv layout.
        state_dict.setdefault(prefix + "filters", self.filters)
        for name in ("w1.weight", "w2.weight"):
            w = state_dict.get(prefix + name)
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                state_dict[prefix + name] = w[:, :, None, None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def n_filters(self) -> int:
        return self.filters.shape[0]

    def step(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One update of the state x: (B, C, H, W); ``mask`` (B, 1, H, W) or drawn per cell."""
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != self.channels:
            raise ValueError(
                f"x must have {self.channels} channels (NCA.channels), got shape {tuple(x.shape)}"
            )
        return nca_step(
            x,
            self.w1.weight,
            self.w1.bias,
            self.w2.weight,
            self.w2.bias,
            mask=mask,
            fire_rate=self.fire_rate,
            filters=self.filters,
            **self.step_options(),
        )

    def step_options(self) -> dict:
        """The step options (``nca_step`` keywords), JSON-able: what a checkpoint config keeps."""
        clip = None if self.clip is None else {k: list(v) for k, v in self.clip.items()}
        return {
            "padding": self.padding,
            "alive_threshold": self.alive_threshold,
            "alive_channel": self.alive_channel,
            "clip": clip,
            "perception_angle": self.perception_angle,
        }

    def forward(self, x: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """``steps`` updates of x: (B, C, H, W); each draws its own mask from torch's generator."""
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        for _ in range(steps):
            x = self.step(x)
        return x

    def seed(
        self, batch: int, size, random: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Initial grids (batch, C, H, W) on the module's device and dtype; ``size``: int or (H, W).

        ``random=False``: zeros (the lesson's ``make_grids``); with alive masking, the growing
        NCA's seed: zeros but the centre cell ``(H // 2, W // 2)``, whose channels
        ``alive_channel..`` are 1. ``random=True``: uniform noise in
        [-0.5, 0.5) (``to_rgb`` shows it as uniform grey levels in [0, 1)), drawn from ``generator``
        or torch's default generator (``torch.manual_seed`` reproduces it).
        """
        h, w = (size, size) if isinstance(size, numbers.Integral) else tuple(size)
        if batch < 0 or h < 1 or w < 1:
            raise ValueError(f"seed needs batch >= 0 and size >= 1, got batch={batch}, size={size}")
        p = self.w1.weight
        shape = (batch, self.channels, h, w)
        if not random:
            x = torch.zeros(shape, device=p.device, dtype=p.dtype)
            if self.alive_threshold is not None:
                x[:, self.alive_channel :, h // 2, w // 2] = 1.0
            return x
        x = torch.rand(
            shape,
            generator=generator,
            device=p.device if generator is None else generator.device,
            dtype=torch.float32,
        )
        return (x - 0.5).to(device=p.device, dtype=p.dtype)

    @staticmethod
    def to_rgb(x: torch.Tensor) -> torch.Tensor:
        """Display image of a state: the first three channels + 0.5, clipped to [0, 1]."""
        if x.dim() != 4 or x.shape[1] < 3:
            raise ValueError(f"to_rgb needs x of shape (B, C>=3, H, W), got {tuple(x.shape)}")
        return (x[:, :3] + 0.5).clamp(0.0, 1.0)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Display image (B, 3, H, W) in [0, 1] of a state, as ``display`` says: "rgb" is
        ``to_rgb``; "rgb/2": ``x[:3] / 2 + 0.5``; "premultiplied": RGB premultiplied by alpha
        (channel ``alive_channel``, or 3) on white, ``1 - clamp(alpha, 0, 1) + rgb``."""
        if x.dim() != 4 or x.shape[1] < 3:
            raise ValueError(f"image needs x of shape (B, C>=3, H, W), got {tuple(x.shape)}")
        if self.display == "rgb":
            return self.to_rgb(x)
        if self.display == "rgb/2":
            return (x[:, :3] / 2 + 0.5).clamp(0.0, 1.0)
        a = x[:, self.alive_channel : self.alive_channel + 1].clamp(0.0, 1.0)
        return (1.0 - a + x[:, :3]).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        opts = {
            k: v
            for k, v in self.step_options().items()
            if v != {"padding": "circular", "alive_channel": 3, "perception_angle": 0.0}.get(k)
        }
        extra = "".join(f", {k}={v!r}" for k, v in opts.items() if v is not None)
        return (
            f"channels={self.channels}, hidden={self.hidden}, fire_rate={self.fire_rate}, "
            f"n_filters={self.n_filters}{extra}"
        )


def saved_tensor_bytes(fn, *args, exclude=(), **kwargs):
    """Bytes autograd keeps for backward while ``fn(*args, **kwargs)`` runs.

    Every tensor saved for backward is counted once per storage (deduplicated by the storage's
    data pointer, at the storage's full size). Storages of the tensors in ``exclude`` (e.g. the
    model's parameters, which every step shares) are reported apart.
    Returns ``(result, {"saved": bytes not excluded, "excluded": bytes, "tensors": count})``.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args, **kwargs)
    saved = sum(n for p, n in seen.items() if p not in skip)
    return result, {"saved": saved, "excluded": sum(seen.values()) - saved, "tensors": len(seen)}
