"""The lessons' code, written as the lessons write it: the baselines every benchmark compares with.

- ``LessonCA``: the NCA lesson's ``SimpleCA`` (F.pad circular + conv2d perception, 1x1 convs,
  ``(rand + rate).floor()`` update mask); ``fastnca.NCA`` loads its state dict as is.
- ``lesson_perceive``: its perception alone.
- ``lesson_style_loss``: the style-transfer lesson's Gram (``einsum('bchw,bdhw->cd') / (h*w)``,
  summed over the batch) and MSE; ``LessonStyleLoss`` its ``StyleLossToTarget`` over
  ``vgg16.features``; ``lesson_iteration`` the NCA lesson's training step (``NCACB``).

Nothing here is fast or meant to be: it is the reference point of ``fastnca bench``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastnca.reference import DEFAULT_FILTERS
from fastnca.style.features import IMAGENET_MEAN, IMAGENET_STD


class LessonCA(nn.Module):
    """The lesson's ``SimpleCA`` as written there (F.pad circular + conv2d perception, 1x1 convs,
    ``(rand + rate).floor()`` mask): the baseline of benchmarks and the layout NCA imports."""

    def __init__(
        self,
        channels: int = 4,
        hidden: int = 8,
        filters: torch.Tensor | None = None,
        zero_w2: bool = True,
    ):
        super().__init__()
        bank = DEFAULT_FILTERS if filters is None else torch.as_tensor(filters)
        self.register_buffer("filters", bank.detach().clone().float(), persistent=False)
        self.w1 = nn.Conv2d(channels * bank.shape[0], hidden, 1)
        self.relu = nn.ReLU()
        self.w2 = nn.Conv2d(hidden, channels, 1, bias=False)
        if zero_w2:
            self.w2.weight.data.zero_()

    def forward(self, x: torch.Tensor, update_rate: float = 0.5) -> torch.Tensor:
        b, ch, h, w = x.shape
        y = F.pad(x.reshape(b * ch, 1, h, w), [1, 1, 1, 1], "circular")
        y = F.conv2d(y, self.filters[:, None].to(x.dtype)).reshape(b, -1, h, w)
        y = self.w2(self.relu(self.w1(y)))
        update_mask = (torch.rand(b, 1, h, w, device=x.device) + update_rate).floor()
        return x + y * update_mask.to(x.dtype)  # (.to: a bfloat16 state stays bfloat16)

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :3, :, :] + 0.5


def lesson_perceive(x, filters):
    """The lesson: x.reshape(B*C, 1, H, W) -> circular pad -> conv2d -> reshape."""
    B, C, H, W = x.shape
    y = F.pad(x.reshape(B * C, 1, H, W), (1, 1, 1, 1), "circular")
    return F.conv2d(y, filters[:, None]).reshape(B, -1, H, W)


def lesson_style_loss(feats, targets):
    """The lesson: einsum('bchw,bdhw->cd') / (h*w) (summed over the batch) and F.mse_loss."""
    return sum(
        F.mse_loss(torch.einsum("bchw,bdhw->cd", f, f) / (f.shape[-2] * f.shape[-1]), t)
        for f, t in zip(feats, targets, strict=True)
    )


class LessonStyleLoss:
    """StyleLossToTarget of the lesson: loop over vgg16.features, batch-summed Grams, MSE."""

    def __init__(self, vgg, target_im, target_layers=(1, 6, 11, 18, 25)):
        self.vgg, self.layers = vgg, target_layers
        dev = target_im.device
        self.mean = torch.tensor(IMAGENET_MEAN, device=dev)[:, None, None]
        self.std = torch.tensor(IMAGENET_STD, device=dev)[:, None, None]
        with torch.no_grad():
            self.target_grams = self.calc_grams(target_im)

    def calc_features(self, imgs):
        x, feats = (imgs - self.mean) / self.std, []
        for i, layer in enumerate(self.vgg[: max(self.layers) + 1]):
            x = layer(x)
            if i in self.layers:
                feats.append(x.clone())
        return feats

    def calc_grams(self, img):
        return [
            torch.einsum("bchw, bdhw -> cd", x, x) / (x.shape[-2] * x.shape[-1])
            for x in self.calc_features(img)
        ]

    def __call__(self, input_im):
        return sum(
            (f1 - f2).pow(2).mean()
            for f1, f2 in zip(self.calc_grams(input_im), self.target_grams, strict=True)
        )


def lesson_iteration(model, loss_fn, pool, opt, batch, steps):
    """The lesson's NCACB: predict, get_loss, backward with gradient normalisation, step."""
    idx = torch.randint(0, len(pool), (batch,))
    x = pool[idx]
    if torch.randint(8, (1,)) < 1:
        x[:1] = torch.zeros_like(x[:1])
    for _ in range(steps):
        x = model(x)
    with torch.no_grad():
        pool[idx] = x
    loss = (x - x.clamp(-1.0, 1.0)).abs().sum() + loss_fn(model.to_rgb(x))
    loss.backward()
    for p in model.parameters():
        p.grad /= p.grad.norm() + 1e-8
    opt.step()
    opt.zero_grad()
    return loss
