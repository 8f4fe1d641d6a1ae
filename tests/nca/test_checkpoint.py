"""NCA checkpoint format: round trip, atomic writes, weights_only loading, clear errors."""

import pickle

import pytest
import torch

from fastnca.nca.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    load_nca,
    save_checkpoint,
)
from fastnca.nca.model import NCA
from fastnca.reference import DEFAULT_FILTERS, DISTILL_FILTERS


def _model(**kw):
    torch.manual_seed(1)
    m = NCA(**dict(dict(channels=5, hidden=7, fire_rate=0.3, filters=DISTILL_FILTERS), **kw))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()  # w2 starts at zero: give every weight a value
    return m


def _same_rollout(a, b, size=(6, 9), steps=3):
    x = a.seed(2, size)
    x = x + torch.randn_like(x)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        ya = a(x, steps=steps)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        yb = b(x, steps=steps)
    torch.testing.assert_close(ya, yb)


def test_round_trip_file_and_run_dir(tmp_path):
    m = _model()
    train = {
        "step": 3,
        "rng": {"torch": torch.get_rng_state()},
        "extra": {"iteration": 3, "losses": [1.0, 0.5, 0.25]},
    }
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", m, {"preset": "texture"}, train)
    for where in (path, tmp_path / "run"):
        ck = load_checkpoint(where)
        assert ck.source == "fastnca" and ck.config["preset"] == "texture"
        assert (ck.config["channels"], ck.config["hidden"], ck.config["fire_rate"]) == (5, 7, 0.3)
        torch.testing.assert_close(torch.tensor(ck.config["filters"]).float(), DISTILL_FILTERS)
        assert ck.iteration == 3 and ck.losses == [1.0, 0.5, 0.25]
        m2 = ck.build_model()
        for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
            assert k == k2
            torch.testing.assert_close(v, v2, rtol=0, atol=0)
        _same_rollout(m, m2)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["version"] == FORMAT_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp files left


def test_diverged_weights_do_not_replace_a_good_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _model())
    good = path.read_bytes()
    bad = _model()
    with torch.no_grad():
        next(bad.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN/inf"):
        save_checkpoint(path, bad)
    assert path.read_bytes() == good


def test_truncated_empty_and_foreign_files(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _model())
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or not"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_checkpoint(tmp_path / "notes.txt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastnca NCA checkpoint.*'weight'"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        load_checkpoint(tmp_path / "tensor.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_loading_never_runs_code_from_the_file(tmp_path, capsys):
    # weights_only=True: a pickle with a callable in it is refused, not executed.
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": FORMAT, "x": _Evil()}, f, protocol=2)
    torch.save({"format": FORMAT, "version": 1, "config": _Evil()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / name)
    assert "code ran" not in capsys.readouterr().out


def test_version_missing_and_not_a_run_dir(tmp_path):
    m = _model()
    path = save_checkpoint(tmp_path / "c.pt", m)
    raw = torch.load(path, weights_only=True)
    torch.save(dict(raw, version=FORMAT_VERSION + 1), tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="upgrade fastnca"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save(dict(raw, config={"channels": 5}), tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_checkpoint(tmp_path / "empty_dir")
    assert issubclass(CheckpointError, ValueError)


def test_lesson_state_dict_import(tmp_path):
    # The lesson's SimpleCA: w1 = Conv2d(4*4, 8, 1), w2 = Conv2d(8, 4, 1, bias=False).
    torch.manual_seed(2)
    sd = {
        "w1.weight": torch.randn(8, 16, 1, 1),
        "w1.bias": torch.randn(8),
        "w2.weight": torch.randn(4, 8, 1, 1),
    }
    torch.save(sd, tmp_path / "lesson.pt")
    ck = load_checkpoint(tmp_path / "lesson.pt")
    assert ck.source == "lesson"
    assert (ck.config["channels"], ck.config["hidden"], ck.config["fire_rate"]) == (4, 8, 0.5)
    torch.testing.assert_close(torch.tensor(ck.config["filters"]).float(), DEFAULT_FILTERS)
    m = load_nca(tmp_path / "lesson.pt")
    # With every cell updating, one step is the lesson's x + w2(relu(w1(perceive(x)))).
    x = torch.randn(1, 4, 5, 6)
    p = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x.reshape(4, 1, 5, 6), (1, 1, 1, 1), "circular"),
        DEFAULT_FILTERS[:, None],
    ).reshape(1, 16, 5, 6)
    h = torch.relu(torch.nn.functional.conv2d(p, sd["w1.weight"], sd["w1.bias"]))
    want = x + torch.nn.functional.conv2d(h, sd["w2.weight"])
    m.fire_rate = 1.0
    torch.testing.assert_close(m(x, steps=1), want, rtol=1e-4, atol=1e-4)
    # Saved again in the fastnca format, it round-trips.
    save_checkpoint(tmp_path / "c.pt", m)
    _same_rollout(m, load_nca(tmp_path / "c.pt"))
    bad = dict(sd, **{"w2.weight": torch.randn(4, 9, 1, 1)})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="inconsistent shapes"):
        load_checkpoint(tmp_path / "bad.pt")


def test_step_options_and_display_round_trip(tmp_path):
    """An imported growing model (zero padding, alive masking, 3 filters, premultiplied display)
    and a clipped texture model keep their step options through a checkpoint."""
    from pathlib import Path

    from fastnca.nca.distill import import_distill, save_distill

    data = Path(__file__).resolve().parents[1] / "data"
    models = {
        **import_distill(data / "ex3_1f98e_lizard.json"),
        **dict(list(import_distill(data / "textures_subset.json").items())[:1]),
    }
    for path, (name, m) in zip(save_distill(models, tmp_path), models.items(), strict=True):
        back = load_nca(path)
        assert back.step_options() == m.step_options() and back.display == m.display, name
        x = m.seed(1, 24) + 0.1 * torch.randn(1, m.channels, 24, 24)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            want = m(x, steps=3)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            got = back(x, steps=3)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    lizard = load_nca(tmp_path / "ex3_1f98e_lizard.pt")
    assert lizard.step_options()["padding"] == "zeros" and lizard.display == "premultiplied"
