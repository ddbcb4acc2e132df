// Fused CPU kernels for one MetaPerturb site (float32, channels_last).
//
// Why: phi's PyTorch form walks the whole feature map about twenty times per site (each
// depthwise convolution, each elementwise op), and on a CPU those passes, not the arithmetic,
// are the cost. Here one image at a time stays in cache while every step runs over it.
//
// Layout: a (B, C, H, W) tensor in channels_last memory, i.e. B images of H x W pixels of C
// contiguous channels; an NCHW tensor is read one image at a time into that order (and results
// written back), so the kernels take either without a pass over the whole tensor. A "shared-kernel convolution" applies one 3x3 kernel k to every channel
// on its own, padding 1, as F.conv2d does (cross-correlation):
//     out[i][j][c] = sum over (di, dj) in {-1, 0, 1}^2 of k[(di+1)*3 + (dj+1)] * x[i+di][j+dj][c].
// Its transpose is the same operation with the kernel rotated by 180 degrees.
//
// Every function works per image (at::parallel_for over the batch) and writes per-image partial
// sums for the reductions over the batch (weight and scale gradients), reduced in a fixed order
// afterwards, so results do not depend on the number of threads.

// Only the headers used (not torch/extension.h): the first-use build takes half the time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(METAPERTURB_VECTOR_MATH)
// glibc's libmvec (linked with -lmvec): vector variants of expf and logf, as <math.h> declares
// them under -ffast-math only.
extern "C" {
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float sinf(float);
}
#endif

namespace {

constexpr int kTaps = 9;

struct Shape {
  int64_t batch, channels, height, width;
  bool planar;  // NCHW memory; the kernels work on each image transposed to channels_last
  int64_t pixels() const { return height * width; }
  int64_t image() const { return height * width * channels; }
};

// channels_last or NCHW (contiguous) memory. Where both hold (one channel, or 1x1 maps) the two
// layouts are the same bytes, and it counts as channels_last.
Shape shape_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "metaperturb native kernels: expected a 4-d feature map");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "metaperturb native kernels: float32 only");
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || x.is_contiguous(),
              "metaperturb native kernels: channels_last or contiguous NCHW memory expected");
  return {x.size(0), x.size(1), x.size(2), x.size(3), !channels_last};
}

// out[j][i] = in[i][j] for an in of rows x cols: full 8x8 tiles through a register-sized block
// with constant bounds (which the compiler turns into vector shuffles; 2x faster than a tiled
// element loop on a 256 x 1024 image), the edges element by element.
void transpose(const float* __restrict in, int64_t rows, int64_t cols, float* __restrict out) {
  const int64_t full_rows = rows / 8 * 8, full_cols = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < full_rows; r0 += 8)
    for (int64_t c0 = 0; c0 < full_cols; c0 += 8) {
      float tile[8][8];
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) tile[j][i] = in[(r0 + i) * cols + c0 + j];
      for (int j = 0; j < 8; ++j)
        for (int i = 0; i < 8; ++i) out[(c0 + j) * rows + r0 + i] = tile[j][i];
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < full_rows ? full_cols : 0; c < cols; ++c) out[c * rows + r] = in[r * cols + c];
}

// Image b of x in channels_last order: in place, or transposed from NCHW into `buffer` (one
// image, in cache, instead of a pass over the whole tensor and a copy kept for backward).
const float* read_image(const float* x, const Shape& s, int64_t b, std::vector<float>& buffer) {
  const float* image = x + b * s.image();
  if (!s.planar) return image;
  if (static_cast<int64_t>(buffer.size()) < s.image()) buffer.resize(s.image());
  transpose(image, s.channels, s.pixels(), buffer.data());
  return buffer.data();
}

// Where image b of an output is computed: in place, or in `buffer` for write_image.
float* output_image(float* out, const Shape& s, int64_t b, std::vector<float>& buffer) {
  if (!s.planar) return out + b * s.image();
  if (static_cast<int64_t>(buffer.size()) < s.image()) buffer.resize(s.image());
  return buffer.data();
}

// Moves an image computed by output_image into an NCHW output (nothing to do in channels_last).
void write_image(float* out, const Shape& s, int64_t b, const float* computed) {
  if (!s.planar) return;
  transpose(computed, s.pixels(), s.channels, out + b * s.image());
}

// A tensor shaped like h in h's layout (a copy only where it is not).
at::Tensor in_layout_of(const at::Tensor& t, const Shape& s) {
  return t.to(at::kFloat).contiguous(s.planar ? at::MemoryFormat::Contiguous
                                              : at::MemoryFormat::ChannelsLast);
}

void rotate(const float* k, float* rotated) {
  for (int t = 0; t < kTaps; ++t) rotated[t] = k[kTaps - 1 - t];
}

// Row i of the shared-kernel convolution of x (H x W x C) with k, into `out` (W * C values):
// written, or added to what `out` holds when `Accumulate`. All nine taps are summed in one loop
// (a column shift is a shift by C values in channels_last), so each output value is stored once.
template <bool Accumulate>
inline void convolve_row(const float* x, const Shape& s, int64_t i, const float* k, float* out) {
  const int64_t C = s.channels, n = s.width * C;
  static thread_local std::vector<float> zeros;
  if (static_cast<int64_t>(zeros.size()) < n) zeros.assign(n, 0.f);
  const float* up = i > 0 ? x + (i - 1) * n : zeros.data();
  const float* mid = x + i * n;
  const float* down = i + 1 < s.height ? x + (i + 1) * n : zeros.data();
  const float k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5], k6 = k[6],
              k7 = k[7], k8 = k[8];
  if (s.width == 1) {
    for (int64_t e = 0; e < C; ++e)
      out[e] = (Accumulate ? out[e] : 0.f) + k1 * up[e] + k4 * mid[e] + k7 * down[e];
    return;
  }
  // First column: no left neighbour.
#pragma omp simd
  for (int64_t e = 0; e < C; ++e)
    out[e] = (Accumulate ? out[e] : 0.f) + k1 * up[e] + k2 * up[e + C] + k4 * mid[e] + k5 * mid[e + C] +
             k7 * down[e] + k8 * down[e + C];
#pragma omp simd
  for (int64_t e = C; e < n - C; ++e)
    out[e] = (Accumulate ? out[e] : 0.f) + k0 * up[e - C] + k1 * up[e] + k2 * up[e + C] + k3 * mid[e - C] +
             k4 * mid[e] + k5 * mid[e + C] + k6 * down[e - C] + k7 * down[e] + k8 * down[e + C];
  // Last column: no right neighbour.
#pragma omp simd
  for (int64_t e = n - C; e < n; ++e)
    out[e] = (Accumulate ? out[e] : 0.f) + k0 * up[e - C] + k1 * up[e] + k3 * mid[e - C] + k4 * mid[e] +
             k6 * down[e - C] + k7 * down[e];
}

// The same for a single-channel H x W map: out (W values) += conv(m, k) at row i.
inline void convolve_row_map(const float* m, const Shape& s, int64_t i, const float* k, float* out) {
  const int64_t W = s.width;
  for (int di = -1; di <= 1; ++di) {
    const int64_t r = i + di;
    if (r < 0 || r >= s.height) continue;
    const float* row = m + r * W;
    for (int dj = -1; dj <= 1; ++dj) {
      const float kv = k[(di + 1) * 3 + (dj + 1)];
      const int64_t first = dj < 0 ? 1 : 0, last = dj > 0 ? W - 1 : W;
      for (int64_t j = first; j < last; ++j) out[j] += kv * row[j + dj];
    }
  }
}

// grad[t] += sum over pixels p and channels c of a[p][c] * b[p + offset(t)][c] (zero outside):
// the gradient of a shared-kernel convolution's kernel, `a` the output gradient, `b` the input.
// `channels` = 1 for single-channel maps.
void accumulate_kernel_grad(const float* a, const float* b, int64_t height, int64_t width,
                            int64_t channels, double* grad) {
  for (int t = 0; t < kTaps; ++t) {
    const int di = t / 3 - 1, dj = t % 3 - 1;
    const int64_t first_col = dj < 0 ? 1 : 0, last_col = dj > 0 ? width - 1 : width;
    if (last_col <= first_col) continue;
    const int64_t n = (last_col - first_col) * channels;
    double total = 0.0;
    for (int64_t i = std::max<int64_t>(0, -di); i < std::min<int64_t>(height, height - di); ++i) {
      const float* ar = a + (i * width + first_col) * channels;
      const float* br = b + ((i + di) * width + first_col + dj) * channels;
      float row = 0.f;
#pragma omp simd reduction(+ : row)
      for (int64_t e = 0; e < n; ++e) row += ar[e] * br[e];
      total += row;
    }
    grad[t] += total;
  }
}

// Mean over the channels of each pixel: m[p] = sum_c x[p][c] / C.
void channel_mean(const float* x, const Shape& s, float* m) {
  const int64_t C = s.channels;
  const float inv = 1.0f / static_cast<float>(C);
  for (int64_t p = 0; p < s.pixels(); ++p) {
    const float* v = x + p * C;
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t c = 0; c < C; ++c) total += v[c];
    m[p] = total * inv;
  }
}

// The channel-equivariant op E(x) = conv(x, self) + conv(mean_c(x), mean) over one image,
// written to `out` (H x W x C); `mean_map` holds mean_c(x). With `relu`, out = relu(E(x)) and
// `out_mean` (if not null) receives mean_c(out).
void equivariant(const float* x, const float* mean_map, const Shape& s, const float* self_k,
                 const float* mean_k, bool relu, float* out, float* out_mean,
                 std::vector<float>& row_map) {
  const int64_t C = s.channels, W = s.width;
  const float inv = 1.0f / static_cast<float>(C);
  for (int64_t i = 0; i < s.height; ++i) {
    float* orow = out + i * W * C;
    std::fill(row_map.begin(), row_map.end(), 0.f);
    convolve_row<false>(x, s, i, self_k, orow);
    convolve_row_map(mean_map, s, i, mean_k, row_map.data());
    for (int64_t j = 0; j < W; ++j) {
      const float shift = row_map[j];
      float* v = orow + j * C;
      if (relu) {
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t c = 0; c < C; ++c) {
          const float e = std::max(v[c] + shift, 0.f);
          v[c] = e;
          total += e;
        }
        if (out_mean != nullptr) out_mean[i * W + j] = total * inv;
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) v[c] += shift;
      }
    }
  }
}

// Transpose of E: dx = conv(dy, rot(self)) + conv(sum_c dy, rot(mean)) / C, written into dx or
// added to it (Accumulate).
template <bool Accumulate>
void equivariant_transpose(const float* dy, const Shape& s, const float* self_k, const float* mean_k,
                           float* dx, std::vector<float>& sum_map, std::vector<float>& row_map) {
  const int64_t C = s.channels, W = s.width;
  float self_r[kTaps], mean_r[kTaps];
  rotate(self_k, self_r);
  rotate(mean_k, mean_r);
  for (int64_t p = 0; p < s.pixels(); ++p) {
    const float* v = dy + p * C;
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t c = 0; c < C; ++c) total += v[c];
    sum_map[p] = total;
  }
  const float inv = 1.0f / static_cast<float>(C);
  for (int64_t i = 0; i < s.height; ++i) {
    float* drow = dx + i * W * C;
    convolve_row<Accumulate>(dy, s, i, self_r, drow);
    std::fill(row_map.begin(), row_map.end(), 0.f);
    convolve_row_map(sum_map.data(), s, i, mean_r, row_map.data());
    for (int64_t j = 0; j < W; ++j) {
      const float shift = row_map[j] * inv;
      float* v = drow + j * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) v[c] += shift;
    }
  }
}

// exp and log only (no log1p): glibc's vector math library has both since 2.22, so the loops
// that call them vectorise (declared below) without -ffast-math, which would assume no NaN or
// infinity where features can overflow.
inline float softplus(float a) { return std::max(a, 0.f) + logf(1.f + expf(-std::fabs(a))); }
inline float sigmoid(float a) { return 1.f / (1.f + expf(-a)); }

// The noise: Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011), the counter-based generator of cuRAND and of torch on CUDA, then the
// Box-Muller transform. Each image's noise is a pure function of (key, image index, position),
// so it is the same for any thread count and can be drawn again in backward instead of being
// stored. One counter gives four 32-bit words, hence four normal numbers: for an image of E
// values and Q = ceil(E / 4), word k of counter q becomes value k * Q + q.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

inline void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                          uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// 24 random bits as a float in (0, 1] (for the logarithm) or [0, 1) (for the angle). Through a
// signed integer: AVX2 has no unsigned-to-float conversion, and the loop would not vectorise.
inline float unit_open_low(uint32_t word) {
  return static_cast<float>(static_cast<int32_t>((word >> 8) + 1)) * (1.f / 16777216.f);
}
inline float unit(uint32_t word) {
  return static_cast<float>(static_cast<int32_t>(word >> 8)) * (1.f / 16777216.f);
}

inline int64_t noise_blocks(int64_t count) { return (count + 3) / 4; }

// N(0, 1) values for image `image` under `key` into out[0, 4 * noise_blocks(count)). The cosine
// is written as a shifted sine: GCC fuses sinf(t) and cosf(t) into one sincos call, which has no
// vector variant, and then the whole loop runs scalar (three times slower).
void standard_normal_image(uint64_t key, uint64_t image, int64_t count, float* out) {
  const int64_t q = noise_blocks(count);
  TORCH_CHECK(q <= INT64_C(0xFFFFFFFF), "metaperturb native kernels: image too large for noise");
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  const uint32_t i0 = static_cast<uint32_t>(image), i1 = static_cast<uint32_t>(image >> 32);
  constexpr float kTwoPi = 6.28318530717958647692f, kQuarterTurn = 1.57079632679489661923f;
#pragma omp simd
  for (int64_t block = 0; block < q; ++block) {
    uint32_t c0 = static_cast<uint32_t>(block), c1 = 0, c2 = i0, c3 = i1;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    const float r0 = std::sqrt(-2.f * logf(unit_open_low(c0))), t0 = kTwoPi * unit(c1);
    const float r1 = std::sqrt(-2.f * logf(unit_open_low(c2))), t1 = kTwoPi * unit(c3);
    out[block] = r0 * sinf(t0);
    out[q + block] = r0 * sinf(t0 + kQuarterTurn);
    out[2 * q + block] = r1 * sinf(t1);
    out[3 * q + block] = r1 * sinf(t1 + kQuarterTurn);
  }
}

// Scratch buffers of one thread, sized for one image.
struct Scratch {
  std::vector<float> mean_in, mean_hidden, hidden, image_a, image_b, sum_map, row_map;
  explicit Scratch(const Shape& s)
      : mean_in(s.pixels()), mean_hidden(s.pixels()), hidden(s.image()), image_a(s.image()),
        image_b(s.image()), sum_map(s.pixels()), row_map(s.width) {}
};

// mu = E2(relu(E1(h))) for one image into `mu`; leaves relu(E1(h)) in scratch.hidden and the
// channel means in scratch.mean_in / mean_hidden.
void noise_mean(const float* h, const Shape& s, const float* w, float* mu, Scratch& scratch) {
  channel_mean(h, s, scratch.mean_in.data());
  equivariant(h, scratch.mean_in.data(), s, w, w + 9, true, scratch.hidden.data(),
              scratch.mean_hidden.data(), scratch.row_map);
  equivariant(scratch.hidden.data(), scratch.mean_hidden.data(), s, w + 18, w + 27, false, mu,
              nullptr, scratch.row_map);
}

at::Tensor flat_weights(const at::Tensor& w, int64_t count) {
  auto flat = w.detach().to(at::kFloat).contiguous().view({-1});
  TORCH_CHECK(flat.numel() == count, "metaperturb native kernels: expected ", count, " weights");
  return flat;
}

// Per-channel values repeated for every pixel of a row, so the elementwise loops below run over
// whole rows (W * C contiguous values) instead of one pixel's C.
std::vector<float> tile_row(const float* per_channel, float factor, const Shape& s) {
  std::vector<float> row(s.width * s.channels);
  for (int64_t j = 0; j < s.width; ++j)
    for (int64_t c = 0; c < s.channels; ++c) row[j * s.channels + c] = per_channel[c] * factor;
  return row;
}

// One row of the sampled site: a = mu + noise, out = h * (gain * softplus(a) + offset), clamped.
// Clamp is a template argument so that the loop has no branch and vectorises.
template <bool Clamp>
inline void sampled_row(const float* x, const float* eps, const float* gain, float offset,
                        float limit, int64_t n, const float* mu, float* out) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const float y = x[e] * (gain[e] * softplus(mu[e] + eps[e]) + offset);
    out[e] = Clamp ? std::min(y, limit) : y;
  }
}

// One row of the sampled site's backward: the direct gradient (into dx), the gain's gradient
// times z summed per element (into scale_sum, reduced per channel by the caller), and the noise
// mean's gradient (into dmu). Where the forward clamped, the gradient is 0.
template <bool Clamp>
inline void sampled_grad_row(const float* x, const float* mu, const float* eps,
                             const float* grad_out, const float* gain, const float* scale,
                             float strength, float offset, float limit, int64_t n, float* dx,
                             float* scale_sum, float* dmu) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const float a = mu[e] + eps[e];
    const float z = softplus(a);
    const float g = gain[e] * z + offset;
    const float grad = (!Clamp || x[e] * g <= limit) ? grad_out[e] : 0.f;
    dx[e] = grad * g;
    const float through_gain = grad * x[e] * strength;
    scale_sum[e] += through_gain * z;
    dmu[e] = through_gain * scale[e] * sigmoid(a);
  }
}

// The noise of image b: the caller's tensor (tests compare paths with it), else Philox's under
// `key`, drawn into `buffer`.
const float* image_noise(const float* given, uint64_t key, int64_t b, const Shape& s,
                         std::vector<float>& buffer) {
  if (given != nullptr) return given + b * s.image();
  standard_normal_image(key, static_cast<uint64_t>(b), s.image(), buffer.data());
  return buffer.data();
}

const float* noise_pointer(const c10::optional<at::Tensor>& noise, const Shape& s) {
  if (!noise.has_value() || !noise->defined()) return nullptr;
  TORCH_CHECK(noise->sizes() == at::IntArrayRef({s.batch, s.channels, s.height, s.width}) &&
                  noise->is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  noise->scalar_type() == at::kFloat,
              "metaperturb native kernels: noise must match h (float32, channels_last)");
  return noise->data_ptr<float>();
}

}  // namespace

// Pooled scale maps: pooled[b][c][k] = mean over pixels of relu(conv(h[b, c], kernels[k])).
// Row r of an image with a zero pixel on each side ((W + 2) * C values), zeros outside the image:
// a 3x3 kernel then reads the same nine offsets for every pixel, edges included.
void padded_row(const float* x, const Shape& s, int64_t r, float* out) {
  const int64_t C = s.channels, n = s.width * C;
  std::fill(out, out + C, 0.f);
  std::fill(out + C + n, out + 2 * C + n, 0.f);
  if (r < 0 || r >= s.height)
    std::fill(out + C, out + C + n, 0.f);
  else
    std::copy(x + r * n, x + (r + 1) * n, out + C);
}

// Three padded rows around row i, moved down one row at a time (one row copied per step).
struct RowWindow {
  std::vector<float> storage;
  float* rows[3];
  const float* x;
  const Shape& s;
  RowWindow(const float* image, const Shape& shape)
      : storage(3 * (shape.width + 2) * shape.channels), x(image), s(shape) {
    const int64_t stride = (s.width + 2) * s.channels;
    for (int r = 0; r < 3; ++r) {
      rows[r] = storage.data() + r * stride;
      padded_row(x, s, r - 1, rows[r]);
    }
  }
  // From rows (i-1, i, i+1) to (i, i+1, i+2).
  void advance(int64_t i) {
    float* oldest = rows[0];
    rows[0] = rows[1];
    rows[1] = rows[2];
    rows[2] = oldest;
    padded_row(x, s, i + 2, rows[2]);
  }
};

// The four scale maps of one row from its padded window, handed to `use(e, m0, m1, m2, m3)` for
// each value e of the row: every input value is loaded once for the 36 taps.
template <class Use>
inline void scale_maps_row(const RowWindow& window, int64_t n, int64_t C, const float* k,
                           Use use) {
  const float* up = window.rows[0];
  const float* mid = window.rows[1];
  const float* down = window.rows[2];
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const float a0 = up[e], a1 = up[e + C], a2 = up[e + 2 * C];
    const float b0 = mid[e], b1 = mid[e + C], b2 = mid[e + 2 * C];
    const float c0 = down[e], c1 = down[e + C], c2 = down[e + 2 * C];
    use(e,
        k[0] * a0 + k[1] * a1 + k[2] * a2 + k[3] * b0 + k[4] * b1 + k[5] * b2 + k[6] * c0 +
            k[7] * c1 + k[8] * c2,
        k[9] * a0 + k[10] * a1 + k[11] * a2 + k[12] * b0 + k[13] * b1 + k[14] * b2 +
            k[15] * c0 + k[16] * c1 + k[17] * c2,
        k[18] * a0 + k[19] * a1 + k[20] * a2 + k[21] * b0 + k[22] * b1 + k[23] * b2 +
            k[24] * c0 + k[25] * c1 + k[26] * c2,
        k[27] * a0 + k[28] * a1 + k[29] * a2 + k[30] * b0 + k[31] * b1 + k[32] * b2 +
            k[33] * c0 + k[34] * c1 + k[35] * c2);
  }
}

at::Tensor scale_pool_forward(const at::Tensor& h, const at::Tensor& kernels) {
  const Shape s = shape_of(h);
  const auto k = flat_weights(kernels, 4 * kTaps);
  auto pooled = at::empty({s.batch, s.channels, 4}, h.options().memory_format(at::MemoryFormat::Contiguous));
  const float* x = h.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  float* out = pooled.data_ptr<float>();
  const float inv_area = 1.0f / static_cast<float>(s.pixels());
  const int64_t n = s.width * s.channels;
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    std::vector<float> sums(4 * n), transposed;
    float k[4 * kTaps];
    std::copy(kp, kp + 4 * kTaps, k);
    for (int64_t b = first; b < last; ++b) {
      const float* image = read_image(x, s, b, transposed);
      std::fill(sums.begin(), sums.end(), 0.f);
      // Row by row, the four maps of a row in one pass over its three input rows; relu and a
      // running sum per (column, channel), reduced over the columns at the end.
      RowWindow window(image, s);
      float* t0 = sums.data();
      float* t1 = t0 + n;
      float* t2 = t1 + n;
      float* t3 = t2 + n;
      for (int64_t i = 0; i < s.height; ++i) {
        scale_maps_row(window, n, s.channels, k,
                       [=](int64_t e, float m0, float m1, float m2, float m3) {
                         t0[e] += std::max(m0, 0.f);
                         t1[e] += std::max(m1, 0.f);
                         t2[e] += std::max(m2, 0.f);
                         t3[e] += std::max(m3, 0.f);
                       });
        if (i + 1 < s.height) window.advance(i);
      }
      for (int m = 0; m < 4; ++m) {
        for (int64_t c = 0; c < s.channels; ++c) {
          float total = 0.f;
          for (int64_t j = 0; j < s.width; ++j) total += sums[m * n + j * s.channels + c];
          out[(b * s.channels + c) * 4 + m] = total * inv_area;
        }
      }
    }
  });
  return pooled;
}

// Channels c0 .. c0 + width of a channels_last image as an image of `width` channels (the image
// itself when that is all of them; channels past the last are zeros).
const float* channel_block(const float* image, const Shape& s, int64_t c0, int64_t width,
                           std::vector<float>& buffer) {
  if (c0 == 0 && width == s.channels) return image;
  buffer.resize(s.pixels() * width);
  const int64_t valid = std::min(width, s.channels - c0);
  for (int64_t p = 0; p < s.pixels(); ++p) {
    const float* from = image + p * s.channels + c0;
    float* to = buffer.data() + p * width;
    std::copy(from, from + valid, to);
    std::fill(to + valid, to + width, 0.f);
  }
  return buffer.data();
}

// The inverse of channel_block: its first valid channels back into the whole image.
void scatter_channel_block(const float* block, const Shape& s, int64_t c0, int64_t width,
                           float* image) {
  const int64_t valid = std::min(width, s.channels - c0);
  for (int64_t p = 0; p < s.pixels(); ++p)
    std::copy(block + p * width, block + p * width + valid, image + p * s.channels + c0);
}

// Backward of scale_pool_forward: (grad_h, grad_kernels (4, 1, 3, 3) or undefined).
//
// A row pipeline: the gradient of each map's row r (the pooled gradient where the map is
// positive) is computed from the input rows r-1..r+1, its kernel gradient taken from the same
// rows, and grad_h's row r-1 as soon as the map rows r-2..r exist. Only three rows of each map
// are kept (a ring), so maps of hundreds of channels stay in cache; whole-image buffers of the
// four maps did not (3x slower on 8x8x1024 maps).

// The kernel gradients of two maps from one row: grad_a[t] += sum over the row of dy_a[e] *
// x[e + offset(t)] (x's three padded rows around it), likewise for b: a convolution's kernel
// gradient, the output gradient cross-correlated with the input. Each input value is loaded
// once for the 18 products; the row's float sums are added into doubles.
inline void kernel_grad_pair_row(const float* a, const float* b, const RowWindow& x, int64_t n,
                                 int64_t C, double* grad_a, double* grad_b) {
  const float* up = x.rows[0];
  const float* mid = x.rows[1];
  const float* down = x.rows[2];
  float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, a8 = 0;
  float b0 = 0, b1 = 0, b2 = 0, b3 = 0, b4 = 0, b5 = 0, b6 = 0, b7 = 0, b8 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7, a8, b0, b1, b2, b3, b4, b5, b6, b7, b8)
  for (int64_t e = 0; e < n; ++e) {
    const float x0 = up[e], x1 = up[e + C], x2 = up[e + 2 * C];
    const float x3 = mid[e], x4 = mid[e + C], x5 = mid[e + 2 * C];
    const float x6 = down[e], x7 = down[e + C], x8 = down[e + 2 * C];
    const float da = a[e], db = b[e];
    a0 += da * x0; a1 += da * x1; a2 += da * x2; a3 += da * x3; a4 += da * x4;
    a5 += da * x5; a6 += da * x6; a7 += da * x7; a8 += da * x8;
    b0 += db * x0; b1 += db * x1; b2 += db * x2; b3 += db * x3; b4 += db * x4;
    b5 += db * x5; b6 += db * x6; b7 += db * x7; b8 += db * x8;
  }
  const float ra[kTaps] = {a0, a1, a2, a3, a4, a5, a6, a7, a8};
  const float rb[kTaps] = {b0, b1, b2, b3, b4, b5, b6, b7, b8};
  for (int t = 0; t < kTaps; ++t) {
    grad_a[t] += ra[t];
    grad_b[t] += rb[t];
  }
}

// One row of the sum over m of conv(dy_m, k_m) for four padded maps given as rows[m] = (row
// above, row, row below) (k_m already rotated: the transposed convolutions of the scale maps),
// one pass for all 36 taps.
inline void transposed_row(const float* const (&rows)[4][3], const float* k, int64_t n,
                           int64_t C, float* __restrict out) {
  const float* __restrict u0 = rows[0][0];
  const float* __restrict c0 = rows[0][1];
  const float* __restrict d0 = rows[0][2];
  const float* __restrict u1 = rows[1][0];
  const float* __restrict c1 = rows[1][1];
  const float* __restrict d1 = rows[1][2];
  const float* __restrict u2 = rows[2][0];
  const float* __restrict c2 = rows[2][1];
  const float* __restrict d2 = rows[2][2];
  const float* __restrict u3 = rows[3][0];
  const float* __restrict c3 = rows[3][1];
  const float* __restrict d3 = rows[3][2];
  const int64_t C2 = 2 * C;
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    out[e] = k[0] * u0[e] + k[1] * u0[e + C] + k[2] * u0[e + C2] + k[3] * c0[e] +
             k[4] * c0[e + C] + k[5] * c0[e + C2] + k[6] * d0[e] + k[7] * d0[e + C] +
             k[8] * d0[e + C2] + k[9] * u1[e] + k[10] * u1[e + C] + k[11] * u1[e + C2] +
             k[12] * c1[e] + k[13] * c1[e + C] + k[14] * c1[e + C2] + k[15] * d1[e] +
             k[16] * d1[e + C] + k[17] * d1[e + C2] + k[18] * u2[e] + k[19] * u2[e + C] +
             k[20] * u2[e + C2] + k[21] * c2[e] + k[22] * c2[e + C] + k[23] * c2[e + C2] +
             k[24] * d2[e] + k[25] * d2[e + C] + k[26] * d2[e + C2] + k[27] * u3[e] +
             k[28] * u3[e + C] + k[29] * u3[e + C2] + k[30] * c3[e] + k[31] * c3[e + C] +
             k[32] * c3[e + C2] + k[33] * d3[e] + k[34] * d3[e + C] + k[35] * d3[e + C2];
  }
}

std::vector<at::Tensor> scale_pool_backward(const at::Tensor& h, const at::Tensor& kernels,
                                               const at::Tensor& grad_pooled, bool kernel_grad) {
  const Shape s = shape_of(h);
  const auto k = flat_weights(kernels, 4 * kTaps);
  const auto gp = grad_pooled.to(at::kFloat).contiguous();
  auto grad_h = at::empty_like(h);
  std::vector<double> partial(kernel_grad ? s.batch * 4 * kTaps : 0, 0.0);
  const float* x = h.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* g = gp.data_ptr<float>();
  float* dx = grad_h.data_ptr<float>();
  const float inv_area = 1.0f / static_cast<float>(s.pixels());
  // Channels are independent here (each map is one kernel applied to every channel alone), so
  // wide maps are taken kChannelBlock channels at a time: the rows of four maps stay in cache.
  constexpr int64_t kChannelBlock = 64;
  const int64_t C = std::min(s.channels, kChannelBlock);
  const Shape block{s.batch, C, s.height, s.width, false};
  const int64_t n = s.width * C, stride = (s.width + 2) * C;
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    // Row r of map m at ring[(m * 3 + r % 3) * stride], padded: the borders stay zero.
    std::vector<float> ring(4 * 3 * stride, 0.f), zeros(stride, 0.f);
    auto map_row = [&](int m, int64_t r) -> float* {
      return r < 0 || r >= s.height ? zeros.data() : ring.data() + (m * 3 + r % 3) * stride;
    };
    std::vector<float> transposed, computed, factor(4 * n), block_in, block_out;
    float kr[4 * kTaps];  // each map's kernel rotated by 180 degrees: the transposed conv's
    for (int m = 0; m < 4; ++m) rotate(kp + m * kTaps, kr + m * kTaps);
    for (int64_t b = first; b < last; ++b) {
      const float* whole = read_image(x, s, b, transposed);
      float* dwhole = output_image(dx, s, b, computed);
      double* grad = kernel_grad ? partial.data() + b * 4 * kTaps : nullptr;
      for (int64_t c0 = 0; c0 < s.channels; c0 += C) {
      const int64_t width_c = std::min(C, s.channels - c0);
      const float* image = channel_block(whole, s, c0, C, block_in);
      float* dimage = dwhole;
      if (C != s.channels) {
        block_out.resize(block.image());
        dimage = block_out.data();
      }
      for (int m = 0; m < 4; ++m)
        for (int64_t j = 0; j < s.width; ++j)
          for (int64_t c = 0; c < C; ++c)
            factor[m * n + j * C + c] =
                c < width_c ? g[(b * s.channels + c0 + c) * 4 + m] * inv_area : 0.f;
      RowWindow window(image, block);
      for (int64_t r = 0; r <= s.height; ++r) {
        if (r < s.height) {
          float* d0 = map_row(0, r) + C;
          float* d1 = map_row(1, r) + C;
          float* d2 = map_row(2, r) + C;
          float* d3 = map_row(3, r) + C;
          const float* f = factor.data();
          scale_maps_row(window, n, C, kp, [=](int64_t e, float m0, float m1, float m2, float m3) {
            d0[e] = m0 > 0.f ? f[e] : 0.f;
            d1[e] = m1 > 0.f ? f[n + e] : 0.f;
            d2[e] = m2 > 0.f ? f[2 * n + e] : 0.f;
            d3[e] = m3 > 0.f ? f[3 * n + e] : 0.f;
          });
          if (grad != nullptr) {
            kernel_grad_pair_row(d0, d1, window, n, C, grad, grad + kTaps);
            kernel_grad_pair_row(d2, d3, window, n, C, grad + 2 * kTaps, grad + 3 * kTaps);
          }
          if (r + 1 < s.height) window.advance(r);
        }
        if (r >= 1) {  // grad_h's row r - 1, from the map rows r - 2 .. r
          const int64_t i = r - 1;
          const float* const rows[4][3] = {
              {map_row(0, i - 1), map_row(0, i), map_row(0, i + 1)},
              {map_row(1, i - 1), map_row(1, i), map_row(1, i + 1)},
              {map_row(2, i - 1), map_row(2, i), map_row(2, i + 1)},
              {map_row(3, i - 1), map_row(3, i), map_row(3, i + 1)}};
          transposed_row(rows, kr, n, C, dimage + i * n);
        }
      }
      if (dimage != dwhole) scatter_channel_block(dimage, s, c0, C, dwhole);
      }
      write_image(dx, s, b, dwhole);
    }
  });
  at::Tensor grad_k;
  if (kernel_grad) {
    grad_k = at::empty({4, 1, 3, 3}, h.options().memory_format(at::MemoryFormat::Contiguous));
    float* gk = grad_k.data_ptr<float>();
    for (int64_t e = 0; e < 4 * kTaps; ++e) {
      double total = 0.0;
      for (int64_t b = 0; b < s.batch; ++b) total += partial[b * 4 * kTaps + e];
      gk[e] = static_cast<float>(total);
    }
  }
  return {grad_h, grad_k};
}

// The sampled site: a = E2(relu(E1(h))) + noise, z = softplus(a), g = scale[c] * c * z + (1 - c),
// out = h * g, clamped from above at `clip` when clip > 0. The noise is `noise` when given, else
// Philox's under `key`; backward draws it again from the same key, so nothing but h is kept.
at::Tensor sampled_forward(const at::Tensor& h, const at::Tensor& weights,
                           const c10::optional<at::Tensor>& noise, int64_t key,
                           const at::Tensor& scale, double strength, double clip) {
  const Shape s = shape_of(h);
  const float* given = noise_pointer(noise, s);
  const auto w = flat_weights(weights, 4 * kTaps);
  const auto sc = scale.detach().to(at::kFloat).contiguous();
  TORCH_CHECK(sc.numel() == s.channels, "metaperturb native kernels: one scale per channel");
  auto out = at::empty_like(h);
  const float* x = h.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float c = static_cast<float>(strength), offset = 1.f - c;
  const float limit = static_cast<float>(clip);
  const bool clamp = clip > 0;
  const int64_t n = s.width * s.channels;
  const std::vector<float> gain = tile_row(sp, c, s);
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    Scratch scratch(s);
    std::vector<float> drawn(given ? 0 : 4 * noise_blocks(s.image())), transposed, computed;
    for (int64_t b = first; b < last; ++b) {
      const float* image = read_image(x, s, b, transposed);
      float* result = output_image(op, s, b, computed);
      float* mu = scratch.image_a.data();
      noise_mean(image, s, wp, mu, scratch);
      const float* eps = image_noise(given, static_cast<uint64_t>(key), b, s, drawn);
      for (int64_t i = 0; i < s.height; ++i) {
        const int64_t row = i * n;
        if (clamp)
          sampled_row<true>(image + row, eps + row, gain.data(), offset, limit, n, mu + row,
                            result + row);
        else
          sampled_row<false>(image + row, eps + row, gain.data(), offset, limit, n, mu + row,
                             result + row);
      }
      write_image(op, s, b, result);
    }
  });
  return out;
}

// The noise sampled_forward draws for a feature map shaped like h (channels_last), for tests and
// for giving the PyTorch path the same numbers.
at::Tensor standard_normal(const at::Tensor& h, int64_t key) {
  const Shape s = shape_of(h);
  auto out = at::empty_like(h);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    std::vector<float> drawn(4 * noise_blocks(s.image()));
    for (int64_t b = first; b < last; ++b) {
      const float* eps = image_noise(nullptr, static_cast<uint64_t>(key), b, s, drawn);
      if (s.planar)
        write_image(op, s, b, eps);
      else
        std::copy(eps, eps + s.image(), op + b * s.image());
    }
  });
  return out;
}

// Backward of sampled_forward: (grad_h, grad_scale (C), grad_weights (36) or undefined).
std::vector<at::Tensor> sampled_backward(const at::Tensor& h, const at::Tensor& weights,
                                            const c10::optional<at::Tensor>& noise, int64_t key,
                                            const at::Tensor& scale, double strength, double clip,
                                            const at::Tensor& grad_out_any, bool weight_grad) {
  const Shape s = shape_of(h);
  const float* given = noise_pointer(noise, s);
  const auto grad_out = in_layout_of(grad_out_any, s);
  const auto w = flat_weights(weights, 4 * kTaps);
  const auto sc = scale.detach().to(at::kFloat).contiguous();
  auto grad_h = at::empty_like(h);
  std::vector<double> scale_partial(s.batch * s.channels, 0.0);
  std::vector<double> weight_partial(weight_grad ? s.batch * 4 * kTaps : 0, 0.0);
  const float* x = h.data_ptr<float>();
  const float* go = grad_out.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* dxp = grad_h.data_ptr<float>();
  const float c = static_cast<float>(strength), offset = 1.f - c;
  const float limit = static_cast<float>(clip);
  const bool clamp = clip > 0;
  const int64_t C = s.channels;
  const int64_t n = s.width * C;
  const std::vector<float> gain = tile_row(sp, c, s), scale_row = tile_row(sp, 1.f, s);
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    Scratch scratch(s);
    std::vector<float> mu(s.image()), row_sums(n);
    std::vector<float> drawn(given ? 0 : 4 * noise_blocks(s.image()));
    std::vector<float> transposed, transposed_grad, computed;
    for (int64_t b = first; b < last; ++b) {
      const float* image = read_image(x, s, b, transposed);
      const float* grad_image = read_image(go, s, b, transposed_grad);
      float* dx = output_image(dxp, s, b, computed);
      float* dmu = scratch.image_a.data();
      // Recompute the forward: hidden = relu(E1(h)) (also E1's relu mask, hidden > 0), its
      // channel means, mu = E2(hidden), and the noise.
      noise_mean(image, s, wp, mu.data(), scratch);
      const float* eps = image_noise(given, static_cast<uint64_t>(key), b, s, drawn);
      std::fill(row_sums.begin(), row_sums.end(), 0.f);
      // Direct term, the scale's gradient and the noise mean's gradient.
      for (int64_t i = 0; i < s.height; ++i) {
        const int64_t row = i * n;
        if (clamp)
          sampled_grad_row<true>(image + row, mu.data() + row, eps + row, grad_image + row,
                                 gain.data(), scale_row.data(), c, offset, limit, n, dx + row,
                                 row_sums.data(), dmu + row);
        else
          sampled_grad_row<false>(image + row, mu.data() + row, eps + row, grad_image + row,
                                  gain.data(), scale_row.data(), c, offset, limit, n, dx + row,
                                  row_sums.data(), dmu + row);
      }
      std::vector<float> channel_sums(C, 0.f);
      for (int64_t j = 0; j < s.width; ++j)
        for (int64_t ch = 0; ch < C; ++ch) channel_sums[ch] += row_sums[j * C + ch];
      for (int64_t ch = 0; ch < C; ++ch) scale_partial[b * C + ch] = channel_sums[ch];
      // Push dmu through E2, relu, E1.
      const float* hidden = scratch.hidden.data();
      float* dhidden = scratch.image_b.data();
      equivariant_transpose<false>(dmu, s, wp + 18, wp + 27, dhidden, scratch.sum_map, scratch.row_map);
      if (weight_grad) {
        double* wg = weight_partial.data() + b * 4 * kTaps;
        accumulate_kernel_grad(dmu, hidden, s.height, s.width, C, wg + 18);
        // scratch.sum_map holds sum_c dmu; mu's mean term is conv(mean_c hidden, mean_k).
        accumulate_kernel_grad(scratch.sum_map.data(), scratch.mean_hidden.data(), s.height,
                               s.width, 1, wg + 27);
      }
      for (int64_t e = 0; e < s.image(); ++e) dhidden[e] = hidden[e] > 0.f ? dhidden[e] : 0.f;
      equivariant_transpose<true>(dhidden, s, wp, wp + 9, dx, scratch.sum_map, scratch.row_map);
      write_image(dxp, s, b, dx);
      if (weight_grad) {
        double* wg = weight_partial.data() + b * 4 * kTaps;
        accumulate_kernel_grad(dhidden, image, s.height, s.width, C, wg);
        accumulate_kernel_grad(scratch.sum_map.data(), scratch.mean_in.data(), s.height, s.width,
                               1, wg + 9);
      }
    }
  });
  auto grad_scale = at::empty({C}, sc.options());
  float* gs = grad_scale.data_ptr<float>();
  for (int64_t ch = 0; ch < C; ++ch) {
    double total = 0.0;
    for (int64_t b = 0; b < s.batch; ++b) total += scale_partial[b * C + ch];
    gs[ch] = static_cast<float>(total);
  }
  at::Tensor grad_w;
  if (weight_grad) {
    grad_w = at::empty({4 * kTaps}, sc.options());
    float* gw = grad_w.data_ptr<float>();
    for (int64_t e = 0; e < 4 * kTaps; ++e) {
      double total = 0.0;
      for (int64_t b = 0; b < s.batch; ++b) total += weight_partial[b * 4 * kTaps + e];
      gw[e] = static_cast<float>(total);
    }
  }
  return {grad_h, grad_scale, grad_w};
}

// The deterministic eval site: out = h * (gain[c] * E[softplus(N(mu, 1))] + offset), with the
// expectation's closed-form approximation (slope, bump, width as in phi.expected_softplus),
// clamped from above at `clip` when clip > 0.
at::Tensor expectation_forward(const at::Tensor& h, const at::Tensor& weights,
                                  const at::Tensor& gain, double offset, double clip,
                                  double slope, double bump, double width) {
  const Shape s = shape_of(h);
  const auto w = flat_weights(weights, 4 * kTaps);
  const auto gn = gain.detach().to(at::kFloat).contiguous();
  TORCH_CHECK(gn.numel() == s.channels, "metaperturb native kernels: one gain per channel");
  auto out = at::empty_like(h);
  const float* x = h.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* gp = gn.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fo = static_cast<float>(offset), fs = static_cast<float>(slope);
  const float fb = static_cast<float>(bump), fw = static_cast<float>(width), inv_slope = 1.f / fs;
  const float limit = static_cast<float>(clip);
  const bool clamp = clip > 0;
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    Scratch scratch(s);
    std::vector<float> transposed, computed;
    for (int64_t b = first; b < last; ++b) {
      const float* image = read_image(x, s, b, transposed);
      float* result = output_image(op, s, b, computed);
      float* mu = scratch.image_a.data();
      noise_mean(image, s, wp, mu, scratch);
      for (int64_t p = 0; p < s.pixels(); ++p) {
        const float* xv = image + p * s.channels;
        const float* mv = mu + p * s.channels;
        float* ov = result + p * s.channels;
#pragma omp simd
        for (int64_t ch = 0; ch < s.channels; ++ch) {
          const float m = mv[ch];
          const float expected = softplus(fs * m) * inv_slope + fb * expf(-fw * m * m);
          const float v = xv[ch] * (gp[ch] * expected + fo);
          ov[ch] = clamp ? std::min(v, limit) : v;
        }
      }
      write_image(op, s, b, result);
    }
  });
  return out;
}

// The generator's four output words for one counter and key, for the known-answer test.
std::vector<int64_t> philox(const std::vector<int64_t>& counter, const std::vector<int64_t>& key) {
  TORCH_CHECK(counter.size() == 4 && key.size() == 2, "philox: 4 counter words and 2 key words");
  uint32_t c[4];
  for (int i = 0; i < 4; ++i) c[i] = static_cast<uint32_t>(counter[i]);
  philox4x32_10(c[0], c[1], c[2], c[3], static_cast<uint32_t>(key[0]),
                static_cast<uint32_t>(key[1]));
  return {c[0], c[1], c[2], c[3]};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("philox", &philox);
  module.def("scale_pool_forward", &scale_pool_forward);
  module.def("scale_pool_backward", &scale_pool_backward);
  module.def("sampled_forward", &sampled_forward);
  module.def("sampled_backward", &sampled_backward);
  module.def("expectation_forward", &expectation_forward);
  module.def("standard_normal", &standard_normal);
}
