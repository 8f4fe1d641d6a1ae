"""No silent garbage from the library: ops refuse empty batches, no channels, bad loss weights,
integer or complex NCA weights in the conv layout and meta tensors; the CPU float32 Gram stays
accurate for many pixels; image and weight files that are FIFOs are refused before opening; the
VGG16 download has an overall deadline, a progress line, and leaves no partial file."""

from __future__ import annotations

import http.server
import os
import threading
import time

import pytest
import torch

from fastnca.losses import StyleLoss, content_loss, gram, style_loss
from fastnca.ops import nca_step, perceive


@pytest.mark.parametrize(
    "f, words",
    [
        (torch.rand(0, 4, 8, 8), "batch B >= 1"),
        (torch.rand(1, 0, 8, 8), "channels C >= 1"),
    ],
)
def test_style_loss_refuses_empty_batch_and_no_channels(f, words):
    c = f.shape[1]
    with pytest.raises(ValueError, match=words):
        style_loss(f, torch.rand(c, c))
    with pytest.raises(ValueError, match=words):
        StyleLoss.from_features([f])
    with pytest.raises(ValueError, match=words):
        content_loss(f, f)


@pytest.mark.parametrize(
    "w, err, words",
    [
        (float("nan"), ValueError, "finite number >= 0"),
        (-1.0, ValueError, "finite number >= 0"),
        (float("inf"), ValueError, "finite number >= 0"),
        (torch.tensor(float("nan")), ValueError, "finite number >= 0"),
        (torch.tensor(1.0, device="meta"), ValueError, "is on meta but the features are on cpu"),
        (torch.tensor(1), TypeError, "floating tensor"),
        ("1", TypeError, "a number or a one-element tensor"),
    ],
)
def test_style_loss_weights_checked(w, err, words):
    f, t = torch.rand(2, 3, 5, 7), torch.rand(3, 3)
    with pytest.raises(err, match=words):
        style_loss([f], [t], [w])
    with pytest.raises(err, match=words):
        StyleLoss([t], [w])
    assert torch.isfinite(style_loss([f], [t], [torch.tensor(0.5)]))  # a good tensor weight


def test_nca_step_refuses_integer_complex_conv_weights_and_meta():
    x = torch.rand(1, 4, 6, 7)
    for dtype in (torch.int64, torch.complex64):
        with pytest.raises(TypeError, match="w1 must be a floating tensor"):
            nca_step(x, torch.ones(8, 16, 1, 1, dtype=dtype), None, torch.zeros(4, 8, 1, 1))
        with pytest.raises(TypeError, match="w2 must be a floating tensor"):
            nca_step(x, torch.ones(8, 16, 1, 1), None, torch.zeros(4, 8, 1, 1, dtype=dtype))
    m = dict(device="meta")
    with pytest.raises(ValueError, match="x is on the meta device.*nca_step"):
        nca_step(
            torch.zeros(1, 4, 6, 7, **m), torch.zeros(8, 16, **m), None, torch.zeros(4, 8, **m)
        )
    with pytest.raises(ValueError, match="x is on the meta device.*perceive"):
        perceive(torch.zeros(1, 4, 6, 7, **m))
    with pytest.raises(ValueError, match="channels C >= 1"):
        perceive(torch.zeros(2, 0, 6, 7))


def test_cpu_float32_gram_accurate_for_many_pixels():
    # All ones over 2^25 pixels: past 2^24 a float32 running sum can no longer add 1; the
    # blocked sum (float32 blocks of 4096, float64 block sums) is exact.
    ones = torch.ones(1, 2, 4096, 8192)
    assert torch.equal(gram(ones), torch.ones(1, 2, 2))
    g = torch.Generator().manual_seed(0)
    f = torch.rand(1, 3, 1000, 301, generator=g)  # ragged: not a multiple of the block
    exact = gram(f.double())
    rel = ((gram(f).double() - exact).abs() / exact.abs()).max().item()
    assert rel < 1e-6  # one float32 bmm over these 301,000 pixels: 3.8e-6 on this CPU
    t = exact[0].float()
    assert style_loss(f, t).item() < 1e-12  # the loss of the exact target is ~0, not noise


def test_fifo_weights_file_refused(tmp_path):
    from fastnca.style.features import VGG16Features

    fifo = tmp_path / "w.pth"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        VGG16Features((1,), weights=str(fifo), verbose=False)


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Sends a 1 MB Content-Length, then one byte every 0.1 s: never silent, never done."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(2**20))
        self.end_headers()
        try:
            for _ in range(600):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *a):
        pass


def test_download_deadline_progress_and_no_partial_file(tmp_path, capsys):
    from fastnca.style.features import download_weights

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stale = tmp_path / ".vgg16-397923af.pth.old.part"  # left by a download that was killed
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/vgg16-397923af.pth"
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="not finished within 1s"):
            download_weights(
                url, tmp_path / "vgg16-397923af.pth", timeout=2.0, deadline=1.0, verbose=True
            )
        assert time.monotonic() - t0 < 5  # the per-read timeout alone would never fire
    finally:
        server.shutdown()
        server.server_close()
    assert list(tmp_path.iterdir()) == []  # neither the partial file nor the stale one
    err = capsys.readouterr().err
    assert "downloading vgg16-397923af.pth" in err and "/1 MB" in err
