// The fused NCA step on CPU, tile by tile: a tile is a block of R rows of one image (about 1-2k
// cells, so that its planes and activations stay in the core's cache). Per tile, one thread:
//   perception planes P (NF, C, R, W) of the tile from its circularly padded rows,
//   the fired cells' columns Pc (NF*C, n) gathered from P,
//   the MLP on them through ATen's GEMMs (MKL): h = relu(W1 Pc + b1), y = W2 h + b2,
//   out = x + mask * y on the fired cells.
// The backward recomputes P, Pc and h per tile, forms the weight gradients (partial sums per
// fixed group of tiles, added in group order after the loop: the same result at any thread
// count), dPc = W1^T da, scatters dPc into dense planes dP and applies the filters' adjoint into a
// padded tile accumulator whose interior is the tile's dx (= g + adjoint) and whose two halo rows
// are added to the neighbouring rows after the loop (they belong to other tiles). Tiles (groups
// in backward) go to whichever of torch's intra-op threads is free (parallel_dynamic); ATen calls
// inside the parallel region run single-threaded.
//
// Shapes: x, g (B, C, H, W) contiguous; w1p (HID, NF*C) with columns in plane order f*C + c;
// b1 (HID) or empty; w2 (C, HID); b2 (C) or empty; mask (B, H, W) bool or float (value = the
// update's factor, fired where != 0); taps (K, 4) float64 rows (filter f, row a, col e, value v):
// filter f reads x[i + a - 1, j + e - 1] with weight v.
#include <torch/library.h>

#include "stencil_cpu.h"

namespace {

using fastnca::Tap;
using fastnca::scratch;

constexpr int64_t kGroups = 32;  // tile groups of the backward's weight-gradient partial sums

struct Geom {
  int64_t B, C, H, W, NF, HID, R, tiles_per_image;
};

// P (NF, C, rb, W) <- the filters on rows r0 .. r0+rb-1 of every channel of image xb (C, H, W),
// through the padded rows xp (C, rb+2, W+2).
template <typename T>
void tile_planes(const T* xb, const Geom& g, int64_t r0, int64_t rb,
                 const std::vector<Tap>& taps, T* xp, T* P) {
  for (int64_t c = 0; c < g.C; ++c) {
    T* xpc = xp + c * (rb + 2) * (g.W + 2);
    fastnca::pad_rows(xb + c * g.H * g.W, g.H, g.W, r0, rb, xpc);
    fastnca::filter_rows(xpc, rb, g.W, g.NF, taps, P + c * rb * g.W, g.C * rb * g.W);
  }
}

// Fired cells of tile (b, r0, rb): local indices r*W + j and the mask's factor.
template <typename T>
int64_t fired(const at::Tensor& mask, const Geom& g, int64_t b, int64_t r0, int64_t rb,
              int64_t* loc, T* val) {
  const int64_t off = (b * g.H + r0) * g.W, n = rb * g.W;
  int64_t k = 0;
  if (mask.scalar_type() == at::kBool) {
    const bool* m = mask.data_ptr<bool>() + off;
    for (int64_t i = 0; i < n; ++i)
      if (m[i]) { loc[k] = i; val[k++] = T(1); }
  } else {
    const T* m = mask.data_ptr<T>() + off;
    for (int64_t i = 0; i < n; ++i)
      if (m[i] != T(0)) { loc[k] = i; val[k++] = m[i]; }
  }
  return k;
}

// Pc (rows, n) <- columns loc of P (rows, cols).
template <typename T>
void gather(const T* P, int64_t rows, int64_t cols, const int64_t* loc, int64_t n, T* Pc) {
  for (int64_t q = 0; q < rows; ++q) {
    const T* s = P + q * cols;
    T* d = Pc + q * n;
    for (int64_t t = 0; t < n; ++t) d[t] = s[loc[t]];
  }
}

at::Tensor view(void* p, at::IntArrayRef shape, const at::TensorOptions& o) {
  return at::from_blob(p, shape, o);
}

// h (HID, n) = relu(w1p @ pc + b1): the GEMM, then bias and ReLU in one pass.
template <typename T>
void hidden(at::Tensor& h, const at::Tensor& w1p, const T* b1, const at::Tensor& pc) {
  at::mm_out(h, w1p, pc);
  const int64_t n = h.size(1);
  T* hp = h.data_ptr<T>();
  for (int64_t q = 0; q < h.size(0); ++q) {
    const T b = b1 ? b1[q] : T(0);
    T* r = hp + q * n;
    for (int64_t t = 0; t < n; ++t) r[t] = std::max(r[t] + b, T(0));
  }
}

template <typename T>
const T* bias_ptr(const at::Tensor& b) {
  return b.defined() && b.numel() ? b.data_ptr<T>() : nullptr;
}

Geom geometry(const at::Tensor& x, const at::Tensor& w1p, int64_t rows) {
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), w1p.size(1) / x.size(1), w1p.size(0), 1, 1};
  g.R = std::max<int64_t>(1, std::min<int64_t>(g.H, rows));
  g.tiles_per_image = (g.H + g.R - 1) / g.R;
  return g;
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& w1p, const at::Tensor& b1,
                  const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& mask,
                  const std::vector<Tap>& taps, const Geom& g, at::Tensor& out) {
  const auto o = x.options();
  const int64_t C = g.C, H = g.H, W = g.W, R = g.R, FC = g.NF * C, cells = R * W;
  const T* xs = x.data_ptr<T>();
  T* os = out.data_ptr<T>();
  const T *b1p = bias_ptr<T>(b1), *b2p = bias_ptr<T>(b2);
  fastnca::parallel_dynamic(g.B * g.tiles_per_image, [&](int64_t tile) {
    T *xp = scratch<T>(0, C * (R + 2) * (W + 2)), *P = scratch<T>(1, FC * cells);
    T *Pc = scratch<T>(2, FC * cells), *hb = scratch<T>(3, g.HID * cells);
    T *yb = scratch<T>(4, C * cells), *val = scratch<T>(5, cells);
    int64_t* loc = scratch<int64_t>(0, cells);
    const int64_t b = tile / g.tiles_per_image, r0 = (tile % g.tiles_per_image) * R;
    const int64_t rb = std::min(R, H - r0);
    const T* xb = xs + b * C * H * W;
    T* ob = os + b * C * H * W;
    for (int64_t c = 0; c < C; ++c)
      std::copy(xb + (c * H + r0) * W, xb + (c * H + r0 + rb) * W, ob + (c * H + r0) * W);
    const int64_t n = fired<T>(mask, g, b, r0, rb, loc, val);
    if (n == 0) return;
    tile_planes(xb, g, r0, rb, taps, xp, P);
    gather(P, FC, rb * W, loc, n, Pc);
    auto pc = view(Pc, {FC, n}, o), h = view(hb, {g.HID, n}, o);
    auto y = view(yb, {C, n}, o);
    hidden(h, w1p, b1p, pc);
    at::mm_out(y, w2, h);
    for (int64_t c = 0; c < C; ++c) {  // out = x + mask * (y + b2) on the fired cells
      T* oc = ob + (c * H + r0) * W;
      const T* yc = yb + c * n;
      const T bc = b2p ? b2p[c] : T(0);
      for (int64_t t = 0; t < n; ++t) oc[loc[t]] += (yc[t] + bc) * val[t];
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1p,
                   const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& mask,
                   const std::vector<Tap>& taps, const Geom& g, at::Tensor& dx,
                   std::vector<at::Tensor>& grads) {
  const auto o = x.options();
  const int64_t C = g.C, H = g.H, W = g.W, R = g.R, FC = g.NF * C, HID = g.HID, cells = R * W;
  const int64_t ntiles = g.B * g.tiles_per_image, Wp = W + 2;
  const T* xs = x.data_ptr<T>();
  const T* gs = grad.data_ptr<T>();
  T* dxs = dx.data_ptr<T>();
  // Weight gradients per group of consecutive tiles (summed in tile order inside a group, groups
  // summed in order below): the same sums whatever thread ran a group, and however many threads.
  const int64_t per_group = (ntiles + kGroups - 1) / kGroups;
  const int64_t ngroups = (ntiles + per_group - 1) / per_group;
  auto part = at::zeros({ngroups, HID * FC + HID + C * HID + C}, o);
  const T* b1p = bias_ptr<T>(b1);
  auto halos = at::empty({ntiles, 2, C, W}, o);  // top and bottom halo rows of each tile's dx
  T* hs = halos.data_ptr<T>();
  const auto w1t = w1p.t().contiguous(), w2t = w2.t().contiguous();
  fastnca::parallel_dynamic(ngroups, [&](int64_t group) {
    auto slot = part[group];
    auto dw1 = slot.narrow(0, 0, HID * FC).view({HID, FC});
    auto db1 = slot.narrow(0, HID * FC, HID);
    auto dw2 = slot.narrow(0, HID * FC + HID, C * HID).view({C, HID});
    auto db2 = slot.narrow(0, HID * FC + HID + C * HID, C);
    T *xp = scratch<T>(0, C * (R + 2) * Wp), *P = scratch<T>(1, FC * cells);
    T *Pc = scratch<T>(2, FC * cells), *hb = scratch<T>(3, HID * cells);
    T *gyb = scratch<T>(4, C * cells), *val = scratch<T>(5, cells), *dab = scratch<T>(6, HID * cells);
    T *dpcb = scratch<T>(7, FC * cells), *acc = scratch<T>(8, C * (R + 2) * Wp);
    int64_t* loc = scratch<int64_t>(0, cells);
    for (int64_t tile = group * per_group; tile < std::min(ntiles, (group + 1) * per_group);
         ++tile) {
      const int64_t b = tile / g.tiles_per_image, r0 = (tile % g.tiles_per_image) * R;
      const int64_t rb = std::min(R, H - r0);
      const T* xb = xs + b * C * H * W;
      const T* gb = gs + b * C * H * W;
      std::fill(acc, acc + C * (rb + 2) * Wp, T(0));
      const int64_t n = fired<T>(mask, g, b, r0, rb, loc, val);
      if (n) {
        tile_planes(xb, g, r0, rb, taps, xp, P);
        gather(P, FC, rb * W, loc, n, Pc);
        auto pc = view(Pc, {FC, n}, o), h = view(hb, {HID, n}, o);
        hidden(h, w1p, b1p, pc);
        for (int64_t c = 0; c < C; ++c) {  // gy = mask * g on the fired cells
          const T* gc = gb + (c * H + r0) * W;
          T* d = gyb + c * n;
          for (int64_t t = 0; t < n; ++t) d[t] = gc[loc[t]] * val[t];
        }
        auto gy = view(gyb, {C, n}, o), da = view(dab, {HID, n}, o);
        dw2.addmm_(gy, h.t());
        db2.add_(gy.sum(1));
        at::mm_out(da, w2t, gy);
        for (int64_t q = 0; q < HID * n; ++q) dab[q] = hb[q] > T(0) ? dab[q] : T(0);  // relu'
        dw1.addmm_(da, pc.t());
        db1.add_(da.sum(1));
        auto dpc = view(dpcb, {FC, n}, o);
        at::mm_out(dpc, w1t, da);
        // dP: dPc scattered back to dense planes (P's buffer), then the adjoint filters.
        std::fill(P, P + FC * rb * W, T(0));
        for (int64_t q = 0; q < FC; ++q)
          for (int64_t t = 0; t < n; ++t) P[q * rb * W + loc[t]] = dpcb[q * n + t];
        for (int64_t c = 0; c < C; ++c)
          fastnca::adjoint_rows(P + c * rb * W, C * rb * W, rb, W, taps, acc + c * (rb + 2) * Wp);
      }
      // Fold the halo columns back circularly, write the interior, keep the halo rows.
      T* dxb = dxs + b * C * H * W;
      for (int64_t c = 0; c < C; ++c) {
        fastnca::fold_columns(acc + c * (rb + 2) * Wp, rb + 2, W);
        for (int64_t r = 0; r < rb; ++r) {
          const T* a = acc + (c * (rb + 2) + r + 1) * Wp + 1;
          const T* gr = gb + (c * H + r0 + r) * W;
          T* d = dxb + (c * H + r0 + r) * W;
          for (int64_t j = 0; j < W; ++j) d[j] = gr[j] + a[j];
        }
        const T* top = acc + (c * (rb + 2)) * Wp + 1;
        const T* bot = acc + (c * (rb + 2) + rb + 1) * Wp + 1;
        std::copy(top, top + W, hs + ((tile * 2) * C + c) * W);
        std::copy(bot, bot + W, hs + ((tile * 2 + 1) * C + c) * W);
      }
    }
  });
  for (int64_t tile = 0; tile < ntiles; ++tile) {  // halo rows onto their rows, in tile order
    const int64_t b = tile / g.tiles_per_image, r0 = (tile % g.tiles_per_image) * R;
    for (int64_t c = 0; c < C; ++c)
      fastnca::add_halo_rows(dxs + (b * C + c) * H * W, H, W, r0, std::min(R, H - r0),
                             hs + (tile * 2 * C + c) * W, hs + ((tile * 2 + 1) * C + c) * W);
  }
  auto total = at::zeros({part.size(1)}, o);  // the groups in order
  for (int64_t q = 0; q < ngroups; ++q) total.add_(part[q]);
  grads = {total.narrow(0, 0, HID * FC).view({HID, FC}).clone(),
           total.narrow(0, HID * FC, HID).clone(),
           total.narrow(0, HID * FC + HID, C * HID).view({C, HID}).clone(),
           total.narrow(0, HID * FC + HID + C * HID, C).clone()};  // separate outputs
}

void check(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "x: contiguous (B, C, H, W) expected");
  TORCH_CHECK(mask.dim() == 3 && mask.is_contiguous(), "mask: contiguous (B, H, W) expected");
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == x.scalar_type(),
              "mask: bool or x's dtype expected");
}

}  // namespace

at::Tensor nca_forward(const at::Tensor& x, const at::Tensor& w1p, const at::Tensor& b1,
                       const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& mask,
                       const at::Tensor& taps, int64_t rows) {
  check(x, mask);
  at::NoGradGuard no_grad;
  const auto tp = fastnca::read_taps(taps);
  const Geom g = geometry(x, w1p, rows);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nca_forward", [&] {
    forward_impl<scalar_t>(x, w1p, b1, w2, b2, mask, tp, g, out);
  });
  return out;
}

std::vector<at::Tensor> nca_backward(const at::Tensor& grad, const at::Tensor& x,
                                     const at::Tensor& w1p, const at::Tensor& b1,
                                     const at::Tensor& w2, const at::Tensor& mask,
                                     const at::Tensor& taps, int64_t rows) {
  check(x, mask);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous(), "grad: like x expected");
  at::NoGradGuard no_grad;
  const auto tp = fastnca::read_taps(taps);
  const Geom g = geometry(x, w1p, rows);
  auto dx = at::empty_like(x);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nca_backward", [&] {
    backward_impl<scalar_t>(grad, x, w1p, b1, w2, mask, tp, g, dx, grads);
  });
  grads.insert(grads.begin(), dx);
  return grads;
}

TORCH_LIBRARY_FRAGMENT(fastnca_cpu, m) {
  m.def(
      "nca_forward(Tensor x, Tensor w1p, Tensor b1, Tensor w2, Tensor b2, Tensor mask, "
      "Tensor taps, int rows) -> Tensor",
      &nca_forward);
  m.def(
      "nca_backward(Tensor grad, Tensor x, Tensor w1p, Tensor b1, Tensor w2, Tensor mask, "
      "Tensor taps, int rows) -> Tensor[]",
      &nca_backward);
}
