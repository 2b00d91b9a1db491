// 'Same' 3x3 stride-1 NHWC convolution by Winograd's F(2x2, 3x3), as an XLA FFI handler for XLA:CPU.
//
//   y[b][p][q][o] = act(bias[o] + sum over (i, j, c) of xpad[b][p + i][q + j][c] * k[i][j][c][o])
//
// x (B, H, W, C) float32, k (3, 3, C, O) float32 HWIO (with flip: k[2 - i][2 - j]; with swap_io:
// the kernel is read as (3, 3, O, C), its channels swapped: the input gradient of a 'same'
// convolution is this convolution of the output gradient with flip and swap_io), bias (O,),
// y (B, H, W, O); xpad is x with one row and column of zeros on each side; act is max(0, .) with
// relu, else the identity.
//
// Why: each 2x2 block of outputs is A^T [(G k G^T) . (B^T d B)] A over the block's 4x4 input
// patch d, so per output pixel and channel pair it takes 16 / 4 = 4 products instead of the
// direct convolution's 9. The products are 16 matrix products (one per point of the 4x4
// transformed patch) of (tiles x C) by (C x O), register-tiled as in conv_kernel_grad.cc; the
// tiles are taken in blocks whose transformed patches stay in the core's L2 cache between the
// input transform, the 16 products and the output transform. The transforms add and subtract
// (and halve, for the kernel's), so values differ from the direct sum by a few float32
// roundings of the transformed terms (bounded in tests/test_native_winograd.py).
// Built at first use by pinn_jax.native with the kernel gradient, loaded with ctypes and
// registered with jax.ffi.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads and stores

inline v16 Load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void Store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }

struct WShape {
  int64_t B, H, W, C, O, TH, TW;  // TH x TW tiles of 2 x 2 outputs per image
};

// Transformed patches B^T d B of tiles [t0, t0 + T) into v (16, T, C): point (i, j) of tile t,
// channel c at v[((i * 4 + j) * T + t) * C + c]. C % 16 == 0.
void InputTransform(const WShape& s, const float* x, int64_t t0, int64_t T, float* v) {
  const v16 zero = {};
  for (int64_t t = 0; t < T; ++t) {
    const int64_t tile = t0 + t;
    const int64_t b = tile / (s.TH * s.TW), rem = tile % (s.TH * s.TW);
    const int64_t y0 = 2 * (rem / s.TW) - 1, x0 = 2 * (rem % s.TW) - 1;
    const float* at[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t yy = y0 + i, xx = x0 + j;
        at[i][j] = (yy >= 0 && yy < s.H && xx >= 0 && xx < s.W) ? x + ((b * s.H + yy) * s.W + xx) * s.C : nullptr;
      }
    for (int64_t c = 0; c < s.C; c += 16) {
      v16 d[4][4], r[4][4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) d[i][j] = at[i][j] ? Load(at[i][j] + c) : zero;
      // B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], on rows, then columns
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        r[0][j] = d[0][j] - d[2][j];
        r[1][j] = d[1][j] + d[2][j];
        r[2][j] = d[2][j] - d[1][j];
        r[3][j] = d[1][j] - d[3][j];
      }
      float* out = v + t * s.C + c;
      const int64_t point = T * s.C;
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        Store(out + (i * 4 + 0) * point, r[i][0] - r[i][2]);
        Store(out + (i * 4 + 1) * point, r[i][1] + r[i][2]);
        Store(out + (i * 4 + 2) * point, r[i][2] - r[i][1]);
        Store(out + (i * 4 + 3) * point, r[i][1] - r[i][3]);
      }
    }
  }
}

// Transformed kernel G k G^T into u (16, C, O), for input channels [c0, c1). O % 16 == 0.
void KernelTransform(const WShape& s, const float* k, bool flip, bool swap_io, int64_t c0, int64_t c1, float* u) {
  const v16 half = v16{} + 0.5f;
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t o = 0; o < s.O; o += 16) {
      v16 g[3][3], r[4][3];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
          const int64_t ii = flip ? 2 - i : i, jj = flip ? 2 - j : j;
          if (!swap_io) {
            g[i][j] = Load(k + ((ii * 3 + jj) * s.C + c) * s.O + o);
          } else {  // stored (3, 3, O, C): gather 16 output channels
            const float* base = k + (ii * 3 + jj) * s.O * s.C + c;
            v16 w;
            for (int l = 0; l < 16; ++l) w[l] = base[(o + l) * s.C];
            g[i][j] = w;
          }
        }
      // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]], on rows, then columns
      for (int j = 0; j < 3; ++j) {
        r[0][j] = g[0][j];
        r[1][j] = half * (g[0][j] + g[1][j] + g[2][j]);
        r[2][j] = half * (g[0][j] - g[1][j] + g[2][j]);
        r[3][j] = g[2][j];
      }
      float* out = u + c * s.O + o;
      const int64_t point = s.C * s.O;
      for (int i = 0; i < 4; ++i) {
        Store(out + (i * 4 + 0) * point, r[i][0]);
        Store(out + (i * 4 + 1) * point, half * (r[i][0] + r[i][1] + r[i][2]));
        Store(out + (i * 4 + 2) * point, half * (r[i][0] - r[i][1] + r[i][2]));
        Store(out + (i * 4 + 3) * point, r[i][2]);
      }
    }
  }
}

// m[r][0 : 16 NV] = sum over c of v[r][c] * u[c][0 : 16 NV] for R rows; v rows C apart, u rows
// O apart, m rows ms apart.
template <int R, int NV>
inline void Micro(const float* v, int64_t C, const float* u, int64_t O, float* m, int64_t ms) {
  v16 a[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) a[r][n] = v16{};
  for (int64_t c = 0; c < C; ++c, u += O) {
    v16 uv[NV];
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) uv[n] = Load(u + 16 * n);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float xv = v[r * C + c];
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) a[r][n] += xv * uv[n];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) Store(m + r * ms + 16 * n, a[r][n]);
}

template <int NV>
void Rows(int64_t rows, const float* v, int64_t C, const float* u, int64_t O, float* m, int64_t ms) {
  switch (rows) {
    case 6: Micro<6, NV>(v, C, u, O, m, ms); break;
    case 5: Micro<5, NV>(v, C, u, O, m, ms); break;
    case 4: Micro<4, NV>(v, C, u, O, m, ms); break;
    case 3: Micro<3, NV>(v, C, u, O, m, ms); break;
    case 2: Micro<2, NV>(v, C, u, O, m, ms); break;
    default: Micro<1, NV>(v, C, u, O, m, ms); break;
  }
}

// The 16 products for output channels [o, o + ob) of a block of T tiles: m (16, T, ob).
void Products(const WShape& s, const float* v, int64_t T, const float* u, int64_t o, int64_t ob, float* m) {
  for (int p = 0; p < 16; ++p) {
    const float* vp = v + p * T * s.C;
    const float* up = u + p * s.C * s.O + o;
    float* mp = m + p * T * ob;
    for (int64_t t = 0; t < T; t += 6) {
      const int64_t rows = std::min<int64_t>(6, T - t);
      int64_t n = 0;
      for (; n + 64 <= ob; n += 64) Rows<4>(rows, vp + t * s.C, s.C, up + n, s.O, mp + t * ob + n, ob);
      for (; n + 32 <= ob; n += 32) Rows<2>(rows, vp + t * s.C, s.C, up + n, s.O, mp + t * ob + n, ob);
      for (; n + 16 <= ob; n += 16) Rows<1>(rows, vp + t * s.C, s.C, up + n, s.O, mp + t * ob + n, ob);
    }
  }
}

// A^T m A, plus bias, then the activation, written to the block's 2 x 2 outputs (those inside
// the image) for output channels [o, o + ob).
void OutputTransform(const WShape& s, const float* m, int64_t t0, int64_t T, int64_t o, int64_t ob,
                     const float* bias, bool relu, float* y) {
  const v16 zero = {};
  const int64_t point = T * ob;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t tile = t0 + t;
    const int64_t b = tile / (s.TH * s.TW), rem = tile % (s.TH * s.TW);
    const int64_t y0 = 2 * (rem / s.TW), x0 = 2 * (rem % s.TW);
    for (int64_t n = 0; n < ob; n += 16) {
      const float* mp = m + t * ob + n;
      v16 r[2][4];
      // A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], on rows, then columns
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const v16 m0 = Load(mp + (0 * 4 + j) * point), m1 = Load(mp + (1 * 4 + j) * point);
        const v16 m2 = Load(mp + (2 * 4 + j) * point), m3 = Load(mp + (3 * 4 + j) * point);
        r[0][j] = m0 + m1 + m2;
        r[1][j] = m1 - m2 - m3;
      }
      const v16 bv = Load(bias + o + n);
      for (int i = 0; i < 2; ++i) {
        if (y0 + i >= s.H) break;
        v16 out[2] = {r[i][0] + r[i][1] + r[i][2], r[i][1] - r[i][2] - r[i][3]};
        for (int j = 0; j < 2; ++j) {
          if (x0 + j >= s.W) break;
          v16 val = out[j] + bv;
          if (relu) val = val > zero ? val : zero;
          Store(y + ((b * s.H + y0 + i) * s.W + x0 + j) * s.O + o + n, val);
        }
      }
    }
  }
}

struct Aligned {
  float* p;
  explicit Aligned(int64_t n) : p(static_cast<float*>(std::aligned_alloc(64, ((4 * n + 63) / 64) * 64))) {}
  ~Aligned() { std::free(p); }
};

// Tiles per block, a multiple of 6 (the product's row tile): 48, or 96 from 256 input channels
// (the transformed kernel, 16 C O floats, is read again for every block: with more channels it
// outweighs the blocks' patches in L2), fewer where that leaves under 4 blocks per thread.
// Measured on a 2-core Sapphire Rapids (benchmarks/README.md).
int64_t BlockTiles(int64_t C, int64_t tiles, int64_t threads) {
  const int64_t t = std::min<int64_t>(C >= 256 ? 96 : 48, tiles / (4 * threads));
  return std::max<int64_t>(6, t - t % 6);
}

ffi::Error Conv(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> bias,
                ffi::ResultBuffer<ffi::F32> y, bool flip, bool swap_io, bool relu, int64_t threads) {
  const auto xd = x.dimensions();
  const auto kd = k.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || bias.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("conv_winograd: x, k and y must be 4-d, bias 1-d");
  }
  const int64_t C = xd[3], O = yd[3];
  const int64_t kc = swap_io ? kd[3] : kd[2], ko = swap_io ? kd[2] : kd[3];
  if (kd[0] != 3 || kd[1] != 3 || kc != C || ko != O || yd[0] != xd[0] || yd[1] != xd[1] || yd[2] != xd[2] ||
      bias.dimensions()[0] != O || C % 16 != 0 || O % 16 != 0) {
    return ffi::Error::InvalidArgument("conv_winograd: shapes do not agree (or channels not multiples of 16)");
  }
  WShape s{xd[0], xd[1], xd[2], C, O, (xd[1] + 1) / 2, (xd[2] + 1) / 2};
  const int64_t tiles = s.B * s.TH * s.TW;
  const int64_t T = BlockTiles(C, tiles, std::max<int64_t>(1, threads));
  const int64_t ob = std::min<int64_t>(O, 64);
  const int64_t blocks = (tiles + T - 1) / T;
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
  Aligned u(16 * C * O);
  auto transform_kernel = [&](int64_t t) {
    KernelTransform(s, k.typed_data(), flip, swap_io, C * t / n, C * (t + 1) / n, u.p);
  };
  auto convolve = [&](int64_t t) {
    Aligned v(16 * T * C), m(16 * T * ob);
    for (int64_t blk = blocks * t / n; blk < blocks * (t + 1) / n; ++blk) {
      const int64_t t0 = blk * T, tb = std::min(T, tiles - t0);
      InputTransform(s, x.typed_data(), t0, tb, v.p);
      for (int64_t o = 0; o < O; o += ob) {
        const int64_t width = std::min(ob, O - o);
        Products(s, v.p, tb, u.p, o, width, m.p);
        OutputTransform(s, m.p, t0, tb, o, width, bias.typed_data(), relu, y->typed_data());
      }
    }
  };
  for (auto phase : {0, 1}) {
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < n; ++t) pool.emplace_back([&, t, phase] { phase ? convolve(t) : transform_kernel(t); });
    phase ? convolve(0) : transform_kernel(0);
    for (auto& th : pool) th.join();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PinnJaxConvWinograd, Conv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("flip")
                                  .Attr<bool>("swap_io")
                                  .Attr<bool>("relu")
                                  .Attr<int64_t>("threads"));
