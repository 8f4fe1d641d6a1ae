"""NCA module: presets, seeding, the lesson's SimpleCA as drop-in, and the saved-bytes bound."""

import pytest
import torch

from fastnca import DEFAULT_FILTERS, DISTILL_FILTERS, NCA
from fastnca.lesson import LessonCA
from fastnca.nca.model import saved_tensor_bytes


def test_presets_and_zero_init():
    m = NCA.fastai()
    assert (m.channels, m.hidden, m.n_filters, m.fire_rate) == (4, 8, 4, 0.5)
    assert tuple(m.w1.weight.shape) == (8, 16, 1, 1) and m.w1.bias is not None
    assert tuple(m.w2.weight.shape) == (4, 8, 1, 1) and m.w2.bias is None
    torch.testing.assert_close(m.filters, DEFAULT_FILTERS)
    t = NCA.texture(fire_rate=0.25)
    assert (t.channels, t.hidden, t.fire_rate) == (12, 96, 0.25)
    torch.testing.assert_close(t.filters, DISTILL_FILTERS)
    assert not t.w2.weight.any()
    x = t.seed(2, 9, random=True)
    assert torch.equal(t(x, steps=3), x)  # a new model leaves its state unchanged
    b = NCA(channels=5, hidden=7, bias2=True, zero_init=False)
    assert b.w2.bias is not None and b.w2.weight.any()
    assert "channels=5, hidden=7" in repr(b)


def test_forward_is_repeated_steps_and_lesson_drop_in():
    torch.manual_seed(0)
    lesson = LessonCA(4, 8, zero_w2=False).double()
    m = NCA.fastai().double()
    m.load_state_dict(lesson.state_dict())  # the lesson's layout, as is
    torch.testing.assert_close(m.filters, DEFAULT_FILTERS.double())  # kept: not in lesson dicts
    x0 = torch.randn(2, 4, 11, 6, dtype=torch.float64) * 0.3
    # Same seed -> same masks (the lesson's (rand + rate).floor()) -> same rollout and gradients.
    grads = []
    for model, run in (
        (lesson, lambda x: [x := lesson(x) for _ in range(12)][-1]),
        (m, lambda x: m(x, steps=12)),
    ):
        torch.manual_seed(5)
        x = x0.clone().requires_grad_()
        out = run(x)
        out.square().mean().backward()
        grads.append([out.detach(), x.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    torch.manual_seed(1)
    one = m(x0, steps=2)
    torch.manual_seed(1)
    assert torch.equal(one, m.step(m.step(x0)))
    assert torch.equal(m(x0, steps=0), x0)


def test_from_lesson_state_dict():
    torch.manual_seed(0)
    sd = LessonCA(6, 10, zero_w2=False).state_dict()
    m = NCA.from_lesson_state_dict(sd, fire_rate=0.3)
    assert (m.channels, m.hidden, m.fire_rate, m.w1.bias is not None, m.w2.bias) == (
        6,
        10,
        0.3,
        True,
        None,
    )
    torch.testing.assert_close(m.w1.weight, sd["w1.weight"])
    flat = {
        "w1.weight": sd["w1.weight"].flatten(1),
        "w2.weight": sd["w2.weight"].flatten(1),
        "w2.bias": torch.zeros(6),
    }  # 2-D (linear) weights, no w1 bias, a w2 bias
    m2 = NCA.from_lesson_state_dict(flat, filters=DISTILL_FILTERS)
    assert m2.w1.bias is None and m2.w2.bias is not None
    torch.testing.assert_close(m2.w2.weight.flatten(1), flat["w2.weight"])
    with pytest.raises(ValueError, match=r"w1.weight \(10, 24\).*with 5 filters"):
        NCA.from_lesson_state_dict(sd, filters=torch.zeros(5, 3, 3))
    with pytest.raises(KeyError, match="w2.weight"):
        NCA.from_lesson_state_dict({"w1.weight": sd["w1.weight"]})


def test_state_dict_round_trip_keeps_filters():
    a = NCA(channels=3, hidden=6, filters=DISTILL_FILTERS, zero_init=False)
    assert set(a.state_dict()) == {"filters", "w1.weight", "w1.bias", "w2.weight"}
    b = NCA(channels=3, hidden=6)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.filters, DISTILL_FILTERS)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_seed_and_to_rgb():
    m = NCA.texture().to(torch.float64)
    z = m.seed(3, (5, 7))
    assert z.shape == (3, 12, 5, 7) and z.dtype == torch.float64 and not z.any()
    torch.manual_seed(4)
    r = m.seed(2, 6, random=True)
    torch.manual_seed(4)
    assert torch.equal(r, m.seed(2, 6, random=True))
    assert r.min() >= -0.5 and r.max() < 0.5 and r.std() > 0.2
    gen = torch.Generator().manual_seed(9)
    r1 = m.seed(1, 4, random=True, generator=gen)
    assert torch.equal(r1, m.seed(1, 4, random=True, generator=torch.Generator().manual_seed(9)))
    rgb = NCA.to_rgb(torch.tensor([-2.0, 0.0, 0.2, 9.0]).view(1, 4, 1, 1))
    assert rgb.shape == (1, 3, 1, 1) and rgb.flatten().tolist() == pytest.approx([0.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="to_rgb needs"):
        NCA.to_rgb(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="size >= 1"):
        m.seed(1, 0)


def test_bad_arguments():
    m = NCA.fastai()
    with pytest.raises(ValueError, match=r"x must have 4 channels \(NCA.channels\)"):
        m(torch.zeros(1, 5, 4, 4))
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        m(torch.zeros(1, 4, 4, 4), steps=-1)
    with pytest.raises(ValueError, match=r"fire_rate must be a number in \[0, 1\]"):
        NCA(fire_rate=2)
    with pytest.raises(ValueError, match="fire_rate"):
        m.fire_rate = -0.5
    with pytest.raises(ValueError, match=r"filters must have shape \(F, 3, 3\)"):
        NCA(filters=torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        NCA(hidden=0)


def test_bfloat16_module():
    m = NCA.texture(zero_init=False).to(torch.bfloat16)
    x = m.seed(2, 8, random=True)
    out = m(x, steps=3)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad.dtype == torch.bfloat16 and p.grad.isfinite().all() for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_64_step_texture_rollout(dtype):
    # The bound is per cell, so a small grid shows it: the fused step keeps the state (C values) and
    # the bool mask (1 byte) per cell and step; shared weights are counted once, apart.
    torch.manual_seed(0)
    steps, B, H, W = 64, 1, 8, 8
    m = NCA.texture(zero_init=False).to(dtype)
    x = m.seed(B, (H, W), random=True)
    shared = [*m.parameters(), m.filters]
    out, info = saved_tensor_bytes(m, x, steps=steps, exclude=shared)
    cells = steps * B * H * W
    size = torch.finfo(dtype).bits // 8
    assert info["saved"] <= cells * (size * m.channels + 1)
    assert info["saved"] >= cells * (size * m.channels)  # it does keep every step's state
    assert info["excluded"] <= sum(t.numel() * t.element_size() for t in shared)
    out.float().square().mean().backward()  # and backward runs from what was kept
    assert m.w1.weight.grad.isfinite().all() and m.w1.weight.grad.any()
    if dtype == torch.float32:  # the lesson's module keeps several hundred bytes per cell
        lesson = LessonCA(12, 96, DISTILL_FILTERS, zero_w2=False)
        lesson.load_state_dict({k: v for k, v in m.state_dict().items() if k != "filters"})
        _, ref = saved_tensor_bytes(lambda x: [x := lesson(x) for _ in range(steps)][-1], x)
        assert ref["saved"] >= 10 * info["saved"] and ref["saved"] / cells > 300


def test_rollout_under_cpu_autocast_bf16_matches_float32():
    # MixedPrecision(bf16) wraps predict in autocast; the step must still run (in float32).
    model = NCA(4, 8, zero_init=False)
    x = torch.randn(2, 4, 8, 8)
    torch.manual_seed(1)
    want = model(x, steps=2)
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16):
        got = model(x, steps=2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
