// 'Same' 3x3 stride-1 NHWC convolution by Winograd's F(2x2, 3x3) or F(4x4, 3x3), as an XLA FFI
// handler for XLA:CPU.
//
//   y[b][p][q][o] = act(bias[o] + sum over (i, j, c) of xpad[b][p + i][q + j][c] * k[i][j][c][o])
//
// x (B, H, W, C) float32, k (3, 3, C, O) float32 HWIO (with flip: k[2 - i][2 - j]; with swap_io:
// the kernel is read as (3, 3, O, C), its channels swapped: the input gradient of a 'same'
// convolution is this convolution of the output gradient with flip and swap_io), bias (O,),
// y (B, H, W, O); xpad is x with one row and column of zeros on each side; act is max(0, .) with
// relu, else the identity.
//
// Why: each M x M block of outputs (M = tile, 2 or 4) is A^T [(G k G^T) . (B^T d B)] A over the
// block's N x N input patch d (N = M + 2), so per output pixel and channel pair it takes N^2 / M^2
// products (4, or 2.25) instead of the direct convolution's 9. The products are N^2 matrix
// products (one per point of the transformed patch) of (tiles x C) by (C x O), register-tiled as
// in conv_kernel_grad.cc; the tiles are taken in blocks whose transformed patches stay in the
// core's L2 cache between the input transform, the products and the output transform. Values
// differ from the direct sum by float32 roundings of the transformed terms, more for M = 4
// (coefficients up to 8), bounded in pinn_jax.native._winograd_bound and tested.
// Built at first use by pinn_jax.native with the kernel gradient, loaded with ctypes and
// registered with jax.ffi.

#include <algorithm>
#include <atomic>
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
  int64_t B, H, W, C, O, TH, TW;  // TH x TW tiles of M x M outputs per image
};

// F(M x M, 3x3)'s matrices (Lavin and Gray's, interpolation points 0, +-1 and for M = 4 +-2,
// and infinity): an M x M block of outputs is A^T [(G k G^T) . (B^T d B)] A for the block's
// N x N input patch d, N = M + 2.
template <int M>
struct Wino;

template <>
struct Wino<2> {
  static constexpr int N = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

template <>
struct Wino<4> {
  static constexpr int N = 6;
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                     {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float G[6][3] = {{1.0f / 4, 0, 0},
                                    {-1.0f / 6, -1.0f / 6, -1.0f / 6},
                                    {-1.0f / 6, 1.0f / 6, -1.0f / 6},
                                    {1.0f / 24, 1.0f / 12, 1.0f / 6},
                                    {1.0f / 24, -1.0f / 12, 1.0f / 6},
                                    {0, 0, 1}};
  static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

// out[i] = sum over k of T[i][k] * in[k * stride] (with Transpose, T[k][i]), the terms in k
// order, zero coefficients skipped (the tables are constants: the tests and branches fold away
// when unrolled).
template <bool Transpose, int I, int J>
inline void Apply(const float (&t)[I][J], const v16* in, int stride, v16* out, int out_stride) {
  constexpr int R = Transpose ? J : I, K = Transpose ? I : J;
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    v16 acc = {};
    bool first = true;
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const float c = Transpose ? t[k][i] : t[i][k];
      if (c == 0.0f) continue;
      const v16 term = c == 1.0f ? in[k * stride] : c == -1.0f ? -in[k * stride] : c * in[k * stride];
      acc = first ? term : acc + term;
      first = false;
    }
    out[i * out_stride] = acc;
  }
}

// Tile `tile`'s first output: image b, row y0, column x0 (tiles of M x M outputs, row-major).
inline void Origin(const WShape& s, int64_t tile, int M, int64_t& b, int64_t& y0, int64_t& x0) {
  b = tile / (s.TH * s.TW);
  const int64_t rem = tile % (s.TH * s.TW);
  y0 = M * (rem / s.TW);
  x0 = M * (rem % s.TW);
}

// at[i][j]: channel 0 of pixel (y0 - offset + i, x0 - offset + j) of tile `tile`'s image in
// `data` (`channels` floats a pixel), nullptr outside the image.
template <int S>
inline void Patch(const WShape& s, const float* data, int64_t channels, int64_t tile, int M, int offset,
                  const float* (&at)[S][S]) {
  int64_t b, y0, x0;
  Origin(s, tile, M, b, y0, x0);
  for (int i = 0; i < S; ++i)
    for (int j = 0; j < S; ++j) {
      const int64_t yy = y0 - offset + i, xx = x0 - offset + j;
      at[i][j] = (yy >= 0 && yy < s.H && xx >= 0 && xx < s.W) ? data + ((b * s.H + yy) * s.W + xx) * channels : nullptr;
    }
}

// For tiles [t0, t0 + T): each tile's S x S patch of `data` (B, H, W, channels) starting
// `offset` pixels before its first output (zeros outside the image), transformed on columns then
// rows by `table` (with Transpose, its transpose) into an L x L patch, written to
// out (L * L, T, channels): point (i, j) of tile t, channel c at out[((i * L + j) * T + t) *
// channels + c]. channels % 16 == 0.
template <int S, bool Transpose, int I, int J>
void PatchTransform(const WShape& s, const float* data, int64_t channels, int64_t t0, int64_t T, int M, int offset,
                    const float (&table)[I][J], float* out) {
  constexpr int L = Transpose ? J : I;
  const v16 zero = {};
  const int64_t point = T * channels;
  for (int64_t t = 0; t < T; ++t) {
    const float* at[S][S];
    Patch<S>(s, data, channels, t0 + t, M, offset, at);
    for (int64_t c = 0; c < channels; c += 16) {
      v16 d[S][S], r[L][S], w[L][L];
#pragma GCC unroll 6
      for (int i = 0; i < S; ++i)
#pragma GCC unroll 6
        for (int j = 0; j < S; ++j) d[i][j] = at[i][j] ? Load(at[i][j] + c) : zero;
#pragma GCC unroll 6
      for (int j = 0; j < S; ++j) Apply<Transpose>(table, &d[0][j], S, &r[0][j], S);  // on columns
#pragma GCC unroll 6
      for (int i = 0; i < L; ++i) Apply<Transpose>(table, &r[i][0], 1, &w[i][0], 1);  // on rows
      float* o = out + t * channels + c;
#pragma GCC unroll 6
      for (int i = 0; i < L; ++i)
#pragma GCC unroll 6
        for (int j = 0; j < L; ++j) Store(o + (i * L + j) * point, w[i][j]);
    }
  }
}

// Transformed patches B^T d B of tiles [t0, t0 + T) of x (B, H, W, C) into v (N * N, T, C).
template <int M>
void InputTransform(const WShape& s, const float* x, int64_t t0, int64_t T, float* v) {
  PatchTransform<Wino<M>::N, false>(s, x, s.C, t0, T, M, 1, Wino<M>::BT, v);
}

// Transformed kernel G k G^T into u (N * N, C, O), for input channels [c0, c1). O % 16 == 0.
template <int M>
void KernelTransform(const WShape& s, const float* k, bool flip, bool swap_io, int64_t c0, int64_t c1, float* u) {
  constexpr int N = Wino<M>::N;
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t o = 0; o < s.O; o += 16) {
      v16 g[3][3], r[N][3], w[N][N];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
          const int64_t ii = flip ? 2 - i : i, jj = flip ? 2 - j : j;
          if (!swap_io) {
            g[i][j] = Load(k + ((ii * 3 + jj) * s.C + c) * s.O + o);
          } else {  // stored (3, 3, O, C): gather 16 output channels
            const float* base = k + (ii * 3 + jj) * s.O * s.C + c;
            v16 e;
            for (int l = 0; l < 16; ++l) e[l] = base[(o + l) * s.C];
            g[i][j] = e;
          }
        }
      for (int j = 0; j < 3; ++j) Apply<false>(Wino<M>::G, &g[0][j], 3, &r[0][j], 3);  // G k
      for (int i = 0; i < N; ++i) Apply<false>(Wino<M>::G, &r[i][0], 1, &w[i][0], 1);  // (G k) G^T
      float* out = u + c * s.O + o;
      const int64_t point = s.C * s.O;
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) Store(out + (i * N + j) * point, w[i][j]);
    }
  }
}

// The register tile of every product here (as in conv_kernel_grad.cc): for R rows and 16 NV
// columns, acc[r][0 : 16 NV] (+)= sum over k < K of a[r * a_row + k * a_step] * b[k * b_step + 0 : 16 NV];
// acc rows acc_row apart, loaded first with Accumulate, else started at zero.
template <int R, int NV, bool Accumulate>
inline void Micro(const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t b_step, int64_t K,
                  float* acc, int64_t acc_row) {
  v16 t[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) t[r][n] = Accumulate ? Load(acc + r * acc_row + 16 * n) : v16{};
  for (int64_t k = 0; k < K; ++k, a += a_step, b += b_step) {
    v16 bv[NV];
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) bv[n] = Load(b + 16 * n);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float av = a[r * a_row];
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) t[r][n] += av * bv[n];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) Store(acc + r * acc_row + 16 * n, t[r][n]);
}

template <int NV, bool Accumulate>
void Rows(int64_t rows, const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t b_step, int64_t K,
          float* acc, int64_t acc_row) {
  switch (rows) {
    case 6: Micro<6, NV, Accumulate>(a, a_row, a_step, b, b_step, K, acc, acc_row); break;
    case 5: Micro<5, NV, Accumulate>(a, a_row, a_step, b, b_step, K, acc, acc_row); break;
    case 4: Micro<4, NV, Accumulate>(a, a_row, a_step, b, b_step, K, acc, acc_row); break;
    case 3: Micro<3, NV, Accumulate>(a, a_row, a_step, b, b_step, K, acc, acc_row); break;
    case 2: Micro<2, NV, Accumulate>(a, a_row, a_step, b, b_step, K, acc, acc_row); break;
    default: Micro<1, NV, Accumulate>(a, a_row, a_step, b, b_step, K, acc, acc_row); break;
  }
}

// Micro over 1-6 rows and all of width (a multiple of 16) columns, in blocks of 64, 32 and 16.
template <bool Accumulate>
void Tiles(int64_t rows, int64_t width, const float* a, int64_t a_row, int64_t a_step, const float* b,
           int64_t b_step, int64_t K, float* acc, int64_t acc_row) {
  int64_t c = 0;
  for (; c + 64 <= width; c += 64) Rows<4, Accumulate>(rows, a, a_row, a_step, b + c, b_step, K, acc + c, acc_row);
  for (; c + 32 <= width; c += 32) Rows<2, Accumulate>(rows, a, a_row, a_step, b + c, b_step, K, acc + c, acc_row);
  for (; c + 16 <= width; c += 16) Rows<1, Accumulate>(rows, a, a_row, a_step, b + c, b_step, K, acc + c, acc_row);
}

// The P = N * N products for output channels [o, o + ob) of a block of T tiles: m (P, T, ob).
void Products(const WShape& s, int P, const float* v, int64_t T, const float* u, int64_t o, int64_t ob, float* m) {
  for (int p = 0; p < P; ++p) {
    const float* vp = v + p * T * s.C;
    const float* up = u + p * s.C * s.O + o;
    float* mp = m + p * T * ob;
    for (int64_t t = 0; t < T; t += 6)  // rows: tiles (their C channels contiguous); reduction: C
      Tiles<false>(std::min<int64_t>(6, T - t), ob, vp + t * s.C, s.C, 1, up, s.O, s.C, mp + t * ob, ob);
  }
}

// A^T m A, plus bias, then the activation, written to the block's M x M outputs (those inside
// the image) for output channels [o, o + ob).
template <int M>
void OutputTransform(const WShape& s, const float* m, int64_t t0, int64_t T, int64_t o, int64_t ob,
                     const float* bias, bool relu, float* y) {
  constexpr int N = Wino<M>::N;
  const v16 zero = {};
  const int64_t point = T * ob;
  for (int64_t t = 0; t < T; ++t) {
    int64_t b, y0, x0;
    Origin(s, t0 + t, M, b, y0, x0);
    for (int64_t n = 0; n < ob; n += 16) {
      const float* mp = m + t * ob + n;
      v16 e[N][N], r[M][N], out[M][M];
#pragma GCC unroll 6
      for (int i = 0; i < N; ++i)
#pragma GCC unroll 6
        for (int j = 0; j < N; ++j) e[i][j] = Load(mp + (i * N + j) * point);
#pragma GCC unroll 6
      for (int j = 0; j < N; ++j) Apply<false>(Wino<M>::AT, &e[0][j], N, &r[0][j], N);  // A^T m
#pragma GCC unroll 4
      for (int i = 0; i < M; ++i) Apply<false>(Wino<M>::AT, &r[i][0], 1, &out[i][0], 1);  // (A^T m) A
      const v16 bv = Load(bias + o + n);
      for (int i = 0; i < M && y0 + i < s.H; ++i) {
        for (int j = 0; j < M && x0 + j < s.W; ++j) {
          v16 val = out[i][j] + bv;
          if (relu) val = val > zero ? val : zero;
          Store(y + ((b * s.H + y0 + i) * s.W + x0 + j) * s.O + o + n, val);
        }
      }
    }
  }
}

// Scratch memory kept by the calling thread between calls (grown, never shrunk): a fresh
// allocation of the transformed kernel (up to 36 C O floats, 9.4 MB for 256 x 256 channels) and
// the blocks' buffers would be new pages from the kernel, zeroed and faulted in, on every call.
float* Scratch(int64_t floats) {
  struct Buffer {
    float* p = nullptr;
    int64_t n = 0;
    ~Buffer() { std::free(p); }
  };
  static thread_local Buffer buffer;
  if (buffer.n < floats) {
    std::free(buffer.p);
    buffer.n = 0;
    buffer.p = static_cast<float*>(std::aligned_alloc(64, ((4 * floats + 63) / 64) * 64));
    if (buffer.p != nullptr) buffer.n = floats;
  }
  return buffer.p;
}

// fn(t) for t in [0, n), t = 0 on the calling thread, the others each on a thread of its own;
// returns when all are done.
template <typename Fn>
void OnThreads(int64_t n, Fn fn) {
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n; ++t) pool.emplace_back([&fn, t] { fn(t); });
  fn(0);
  for (auto& th : pool) th.join();
}

// fn(t, i) for every i in [0, items), on n threads as OnThreads, each i taken by whichever thread
// is free rather than in fixed shares: a thread that starts late or shares its core with an op
// XLA runs beside this one leaves its items to the others. t names the thread (its scratch).
template <typename Fn>
void OnFreeThreads(int64_t n, int64_t items, Fn fn) {
  std::atomic<int64_t> next{0};
  OnThreads(n, [&](int64_t t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) fn(t, i);
  });
}

// Tiles per block, a multiple of 6 (the product's row tile), fewer where that leaves under 4
// blocks per thread. F(2x2, 3x3): 48, or 96 from 256 input channels; F(4x4, 3x3) (36 points a
// tile instead of 16): 24, or 48 from 128 input channels. The transformed kernel (P C O floats)
// is read again for every block, so more channels want larger blocks, as long as a block's
// transformed patches stay in L2. Measured on a 2-core Sapphire Rapids (benchmarks/README.md).
int64_t BlockTiles(int M, int64_t C, int64_t tiles, int64_t threads) {
  int64_t t = M == 2 ? (C >= 256 ? 96 : 48) : (C >= 128 ? 48 : 24);
  t = std::min<int64_t>(t, tiles / (4 * threads));
  return std::max<int64_t>(6, t - t % 6);
}

template <int M>
bool Run(const WShape& s, const float* x, const float* k, const float* bias, float* y, bool flip, bool swap_io,
         bool relu, int64_t threads) {
  constexpr int P = Wino<M>::N * Wino<M>::N;
  const int64_t tiles = s.B * s.TH * s.TW;
  const int64_t T = BlockTiles(M, s.C, tiles, threads);
  const int64_t ob = std::min<int64_t>(s.O, 64);
  const int64_t blocks = (tiles + T - 1) / T;
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
  // the transformed kernel, then per thread a block's transformed patches and products, each
  // part starting on a 64-byte line
  const auto lines = [](int64_t floats) { return (floats + 15) / 16 * 16; };
  const int64_t u_size = lines(P * s.C * s.O), v_size = lines(P * T * s.C), m_size = lines(P * T * ob);
  float* scratch = Scratch(u_size + n * (v_size + m_size));
  if (scratch == nullptr) return false;
  float* u = scratch;
  auto transform_kernel = [&](int64_t t) {
    KernelTransform<M>(s, k, flip, swap_io, s.C * t / n, s.C * (t + 1) / n, u);
  };
  // each block's outputs are its own, so which thread computes it does not change them
  auto convolve = [&](int64_t t, int64_t blk) {
    float* v = scratch + u_size + t * (v_size + m_size);
    float* m = v + v_size;
    const int64_t t0 = blk * T, tb = std::min(T, tiles - t0);
    InputTransform<M>(s, x, t0, tb, v);
    for (int64_t o = 0; o < s.O; o += ob) {
      const int64_t width = std::min(ob, s.O - o);
      Products(s, P, v, tb, u, o, width, m);
      OutputTransform<M>(s, m, t0, tb, o, width, bias, relu, y);
    }
  };
  OnThreads(n, transform_kernel);
  OnFreeThreads(n, blocks, convolve);
  return true;
}

ffi::Error Conv(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> bias,
                ffi::ResultBuffer<ffi::F32> y, bool flip, bool swap_io, bool relu, int64_t tile, int64_t threads) {
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
  if (tile != 2 && tile != 4) return ffi::Error::InvalidArgument("conv_winograd: tile must be 2 or 4");
  WShape s{xd[0], xd[1], xd[2], C, O, (xd[1] + tile - 1) / tile, (xd[2] + tile - 1) / tile};
  const int64_t th = std::max<int64_t>(1, threads);
  const bool done = tile == 2 ? Run<2>(s, x.typed_data(), k.typed_data(), bias.typed_data(), y->typed_data(), flip,
                                        swap_io, relu, th)
                              : Run<4>(s, x.typed_data(), k.typed_data(), bias.typed_data(), y->typed_data(), flip,
                                        swap_io, relu, th);
  if (!done) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "conv_winograd: out of memory for scratch");
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Kernel gradient of the same convolution (no flip, no swap):
//
//   dk[i][j][c][o] = sum over (b, p, q) of xpad[b][p + i][q + j][c] * g[b][p][q][o]
//
// the adjoint of the forward's A^T [(G k G^T) . (B^T d B)] A in k: for each tile, the output
// gradient's M x M block is transformed to A g A^T (N x N; outputs outside the image count as
// zeros), multiplied pointwise with the tile's B^T d B and summed over the tiles (N^2 matrix
// products (C x tiles) by (tiles x O), the tiles as the reduction), then dk = G^T S G. Products
// per position and channel pair as in the forward (4 or 2.25 against 9).

// A g A^T of tiles [t0, t0 + T) of g (B, H, W, O) (outputs outside the image count as zeros)
// into gt (N * N, T, O).
template <int M>
void GradTransform(const WShape& s, const float* g, int64_t t0, int64_t T, float* gt) {
  PatchTransform<M, true>(s, g, s.O, t0, T, M, 0, Wino<M>::AT, gt);
}

// sums (P, C, O) += the block's V[p]^T Gt[p] for each point p.
void ProductsT(const WShape& s, int P, const float* v, const float* gt, int64_t T, float* sums) {
  for (int p = 0; p < P; ++p) {
    const float* vp = v + p * T * s.C;
    float* sp = sums + p * s.C * s.O;
    for (int64_t c = 0; c < s.C; c += 6)  // rows: input channels; reduction: the T tiles
      Tiles<true>(std::min<int64_t>(6, s.C - c), s.O, vp + c, 1, s.C, gt + p * T * s.O, s.O, T, sp + c * s.O, s.O);
  }
}

// dk[i][j][c][o] = (G^T S G)[i][j] for input channels [c0, c1).
template <int M>
void KernelGradTransform(const WShape& s, const float* sums, int64_t c0, int64_t c1, float* dk) {
  constexpr int N = Wino<M>::N;
  const int64_t point = s.C * s.O;
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t o = 0; o < s.O; o += 16) {
      v16 e[N][N], r[3][N], w[3][3];
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) e[i][j] = Load(sums + (i * N + j) * point + c * s.O + o);
      for (int j = 0; j < N; ++j) Apply<true>(Wino<M>::G, &e[0][j], N, &r[0][j], N);  // G^T S
      for (int i = 0; i < 3; ++i) Apply<true>(Wino<M>::G, &r[i][0], 1, &w[i][0], 1);  // (G^T S) G
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) Store(dk + ((i * 3 + j) * s.C + c) * s.O + o, w[i][j]);
    }
  }
}

// Tiles per block of the kernel gradient: the tiles are the products' reduction, so a block is
// long (the sums are read and written once per block and point), its two transformed blocks
// (P T (C + O) floats) within ~1 MiB.
int64_t GradBlockTiles(int P, int64_t C, int64_t O, int64_t tiles, int64_t threads) {
  int64_t t = (1 << 20) / (4 * P * (C + O));
  t = std::min<int64_t>(t, (tiles + threads - 1) / threads);
  return std::max<int64_t>(1, t);
}

template <int M>
bool RunKernelGrad(const WShape& s, const float* x, const float* g, float* dk, int64_t threads) {
  constexpr int P = Wino<M>::N * Wino<M>::N;
  const int64_t tiles = s.B * s.TH * s.TW;
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, tiles / 16));
  const int64_t T = GradBlockTiles(P, s.C, s.O, tiles, n);
  const auto lines = [](int64_t floats) { return (floats + 15) / 16 * 16; };
  const int64_t sums_size = lines(P * s.C * s.O), v_size = lines(P * T * s.C), g_size = lines(P * T * s.O);
  float* scratch = Scratch(n * (sums_size + v_size + g_size));
  if (scratch == nullptr) return false;
  // n fixed shares of the tiles, each summed in its own order into its own sums (so the result
  // does not depend on which thread takes it)
  auto accumulate = [&](int64_t t, int64_t q) {
    float* v = scratch + n * sums_size + t * (v_size + g_size);
    float* gt = v + v_size;
    float* sums = scratch + q * sums_size;
    std::memset(sums, 0, sizeof(float) * sums_size);
    const int64_t first = tiles * q / n, last = tiles * (q + 1) / n;
    for (int64_t t0 = first; t0 < last; t0 += T) {
      const int64_t tb = std::min(T, last - t0);
      InputTransform<M>(s, x, t0, tb, v);
      GradTransform<M>(s, g, t0, tb, gt);
      ProductsT(s, P, v, gt, tb, sums);
    }
  };
  auto finish = [&](int64_t t) {  // thread t: channels [c0, c1) of the summed sums, then dk
    const int64_t c0 = s.C * t / n, c1 = s.C * (t + 1) / n;
    for (int64_t q = 1; q < n; ++q) {
      const float* part = scratch + q * sums_size;
      for (int64_t p = 0; p < P; ++p)
        for (int64_t e = (p * s.C + c0) * s.O; e < (p * s.C + c1) * s.O; ++e) scratch[e] += part[e];
    }
    KernelGradTransform<M>(s, scratch, c0, c1, dk);
  };
  OnFreeThreads(n, n, accumulate);
  OnThreads(n, finish);
  return true;
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk, int64_t tile,
                      int64_t threads) {
  const auto xd = x.dimensions();
  const auto gd = g.dimensions();
  const auto kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4) {
    return ffi::Error::InvalidArgument("conv_winograd_kernel_grad: x, g and dk must be 4-d");
  }
  const int64_t C = xd[3], O = gd[3];
  if (gd[0] != xd[0] || gd[1] != xd[1] || gd[2] != xd[2] || kd[0] != 3 || kd[1] != 3 || kd[2] != C || kd[3] != O ||
      C % 16 != 0 || O % 16 != 0) {
    return ffi::Error::InvalidArgument(
        "conv_winograd_kernel_grad: shapes do not agree (or channels not multiples of 16)");
  }
  if (tile != 2 && tile != 4) return ffi::Error::InvalidArgument("conv_winograd_kernel_grad: tile must be 2 or 4");
  WShape s{xd[0], xd[1], xd[2], C, O, (xd[1] + tile - 1) / tile, (xd[2] + tile - 1) / tile};
  const int64_t th = std::max<int64_t>(1, threads);
  const bool done = tile == 2 ? RunKernelGrad<2>(s, x.typed_data(), g.typed_data(), dk->typed_data(), th)
                              : RunKernelGrad<4>(s, x.typed_data(), g.typed_data(), dk->typed_data(), th);
  if (!done) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "conv_winograd_kernel_grad: out of memory");
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
                                  .Attr<int64_t>("tile")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PinnJaxConvWinogradKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("tile")
                                  .Attr<int64_t>("threads"));
