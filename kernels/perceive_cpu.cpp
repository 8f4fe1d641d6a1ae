// perceive on CPU: every channel plane through every filter, circular padding, forward and
// adjoint. Work items are blocks of R rows of one channel plane (parallel_dynamic on torch's
// intra-op threads); a block pads its rows once and writes all filters' rows from them while they
// sit in L1, so x is read once and each output plane written once.
//
// Shapes: x (B, C, H, W) contiguous; out (B, C*NF, H, W) with channel c*NF + f = filter f on
// channel c; taps (K, 4) float64 rows (f, a, e, v) as in stencil_cpu.h.
#include <torch/library.h>

#include "stencil_cpu.h"

namespace {

using fastnca::scratch;

template <typename T>
void forward_impl(const at::Tensor& x, const std::vector<fastnca::Tap>& taps, int64_t nf,
                  int64_t R, at::Tensor& out) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t blocks = (H + R - 1) / R;
  const T* xs = x.data_ptr<T>();
  T* os = out.data_ptr<T>();
  fastnca::parallel_dynamic(B * C * blocks, [&](int64_t task) {
    T* xp = scratch<T>(0, (R + 2) * (W + 2));
    const int64_t plane = task / blocks, r0 = (task % blocks) * R, rb = std::min(R, H - r0);
    fastnca::pad_rows(xs + plane * H * W, H, W, r0, rb, xp);
    fastnca::filter_rows(xp, rb, W, nf, taps, os + plane * nf * H * W + r0 * W, H * W);
  });
}

template <typename T>
void backward_impl(const at::Tensor& g, const std::vector<fastnca::Tap>& taps, int64_t nf,
                   int64_t R, at::Tensor& dx) {
  const int64_t B = dx.size(0), C = dx.size(1), H = dx.size(2), W = dx.size(3);
  const int64_t blocks = (H + R - 1) / R, ntasks = B * C * blocks;
  const T* gs = g.data_ptr<T>();
  T* ds = dx.data_ptr<T>();
  auto halos = at::empty({ntasks, 2, W}, dx.options());  // each block's two halo rows
  T* hs = halos.data_ptr<T>();
  fastnca::parallel_dynamic(ntasks, [&](int64_t task) {
    T* acc = scratch<T>(1, (R + 2) * (W + 2));
    const int64_t plane = task / blocks, r0 = (task % blocks) * R, rb = std::min(R, H - r0);
    std::fill(acc, acc + (rb + 2) * (W + 2), T(0));
    fastnca::adjoint_rows(gs + plane * nf * H * W + r0 * W, H * W, rb, W, taps, acc);
    fastnca::fold_columns(acc, rb + 2, W);
    for (int64_t r = 0; r < rb; ++r) {
      const T* a = acc + (r + 1) * (W + 2) + 1;
      std::copy(a, a + W, ds + (plane * H + r0 + r) * W);
    }
    const T* bottom = acc + (rb + 1) * (W + 2) + 1;
    std::copy(acc + 1, acc + 1 + W, hs + task * 2 * W);
    std::copy(bottom, bottom + W, hs + (task * 2 + 1) * W);
  });
  for (int64_t task = 0; task < ntasks; ++task) {  // halo rows onto their rows, in order
    const int64_t plane = task / blocks, r0 = (task % blocks) * R;
    fastnca::add_halo_rows(ds + plane * H * W, H, W, r0, std::min(R, H - r0), hs + task * 2 * W,
                           hs + (task * 2 + 1) * W);
  }
}

at::Tensor perceive_forward(const at::Tensor& x, const at::Tensor& taps, int64_t nf,
                            int64_t rows) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "x: contiguous (B, C, H, W) expected");
  const auto tp = fastnca::read_taps(taps);
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(x.size(2), rows));
  auto out = at::empty({x.size(0), x.size(1) * nf, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "perceive_forward",
                             [&] { forward_impl<scalar_t>(x, tp, nf, R, out); });
  return out;
}

at::Tensor perceive_backward(const at::Tensor& g, const at::Tensor& taps, int64_t nf,
                             int64_t rows) {
  TORCH_CHECK(g.dim() == 4 && g.is_contiguous() && g.size(1) % nf == 0,
              "grad: contiguous (B, C*NF, H, W) expected");
  const auto tp = fastnca::read_taps(taps);
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(g.size(2), rows));
  auto dx = at::empty({g.size(0), g.size(1) / nf, g.size(2), g.size(3)}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "perceive_backward",
                             [&] { backward_impl<scalar_t>(g, tp, nf, R, dx); });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnca_cpu, m) {
  m.def("perceive_forward(Tensor x, Tensor taps, int nf, int rows) -> Tensor", &perceive_forward);
  m.def("perceive_backward(Tensor grad, Tensor taps, int nf, int rows) -> Tensor",
        &perceive_backward);
}
