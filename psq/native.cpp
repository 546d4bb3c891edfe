// PSBatchNorm's training step on the CPU: one autograd operator (train), and its forward and
// backward as operators of their own (for the compiled path and the tests); each pass over the
// data is two (a per-channel reduction, then one per-element pass).
//
// Every formula is psq.kernels' (which documents them) and psq.stats'; this file only fuses
// them.  Per-channel arithmetic is in double; per-element arithmetic in the input's dtype, as
// torch's own CPU kernels do.  Variances are biased.  Inputs are (N, C, ...) in float32 or
// float64, contiguous or channels-last; each operator checks its inputs (check_input, check_train).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using Per = std::vector<double>;  // one value per channel

constexpr int64_t kGrain = 32768;  // elements a thread gets at least: below, one thread

// How the elements of x lie: `rows` runs of `c` channels (channels-last, or one value per
// channel and sample), or `n` blocks of `c` runs of `inner` values (contiguous).
struct Layout {
  int64_t n, c, inner;
  bool last;
  int64_t rows() const { return n * inner; }
  double count() const { return static_cast<double>(n * inner); }
};

bool channels_last(const Tensor& x) {
  if (x.is_contiguous()) return false;
  return (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

Layout layout_of(const Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t inner = x.numel() / (n * c);
  return {n, c, inner, channels_last(x) || inner == 1};
}

Tensor like(const Tensor& g, const Tensor& x) {
  // The backward reads g in x's layout: autograd may hand it in another.
  if (channels_last(x) && g.dim() == 4) return g.contiguous(at::MemoryFormat::ChannelsLast);
  if (channels_last(x) && g.dim() == 5) return g.contiguous(at::MemoryFormat::ChannelsLast3d);
  return g.contiguous();
}

// The innermost loops, each compiled twice (AVX2 + FMA, and the baseline) and picked at load
// time by the CPU: a build cached on one machine still runs on another.  Sums are taken in the
// element type over blocks of kBlock, then added in double.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PSQ_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PSQ_CLONES
#endif
#define PSQ_INLINE inline __attribute__((always_inline))

constexpr int64_t kBlock = 256;

// Σ(p − k) and Σ(p − k)² over a run.
template <typename T>
PSQ_INLINE void run_moments_body(const T* p, int64_t len, T k, double& a, double& b) {
  for (int64_t at = 0; at < len; at += kBlock) {
    const int64_t stop = std::min(len, at + kBlock);
    T sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
    for (int64_t j = at; j < stop; ++j) {
      const T d = p[j] - k;
      sa += d;
      sb += d * d;
    }
    a += sa, b += sb;
  }
}

// Σg and Σg·(x − m) over a run.
template <typename T>
PSQ_INLINE void run_gradient_body(const T* g, const T* x, int64_t len, T m, double& a, double& b) {
  for (int64_t at = 0; at < len; at += kBlock) {
    const int64_t stop = std::min(len, at + kBlock);
    T sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
    for (int64_t j = at; j < stop; ++j) {
      sa += g[j];
      sb += g[j] * (x[j] - m);
    }
    a += sa, b += sb;
  }
}

// Per channel of one row: a += p − k, b += (p − k)².
template <typename T>
PSQ_INLINE void row_moments_body(const T* __restrict p, const T* __restrict k, T* __restrict a, T* __restrict b,
                                 int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const T d = p[c] - k[c];
    a[c] += d;
    b[c] += d * d;
  }
}

// Per channel of one row: a += g, b += g·(x − m).
template <typename T>
PSQ_INLINE void row_gradient_body(const T* __restrict g, const T* __restrict x, const T* __restrict m,
                                  T* __restrict a, T* __restrict b, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    a[c] += g[c];
    b[c] += g[c] * (x[c] - m[c]);
  }
}

// out = k·g + a·(x − m) + b over a run (without g: a·(x − m) + b).
template <typename T>
PSQ_INLINE void run_affine_body(T* __restrict out, const T* __restrict g, const T* __restrict x, int64_t len, T k,
                                T a, T m, T b) {
  if (g == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) out[j] = a * (x[j] - m) + b;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) out[j] = k * g[j] + a * (x[j] - m) + b;
  }
}

// The same per channel of one row.
template <typename T>
PSQ_INLINE void row_affine_body(T* __restrict out, const T* __restrict g, const T* __restrict x, int64_t C,
                                const T* __restrict k, const T* __restrict a, const T* __restrict m,
                                const T* __restrict b) {
  if (g == nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = a[c] * (x[c] - m[c]) + b[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = k[c] * g[c] + a[c] * (x[c] - m[c]) + b[c];
  }
}

#define PSQ_LOOPS(T)                                                                                              \
  PSQ_CLONES void run_moments(const T* p, int64_t len, T k, double& a, double& b) {                              \
    run_moments_body(p, len, k, a, b);                                                                            \
  }                                                                                                               \
  PSQ_CLONES void run_gradient(const T* g, const T* x, int64_t len, T m, double& a, double& b) {                 \
    run_gradient_body(g, x, len, m, a, b);                                                                        \
  }                                                                                                               \
  PSQ_CLONES void rows_moments(const T* p, int64_t rows, const T* k, T* a, T* b, int64_t C) {                    \
    for (int64_t r = 0; r < rows; ++r) row_moments_body(p + r * C, k, a, b, C);                                   \
  }                                                                                                               \
  PSQ_CLONES void rows_gradient(const T* g, const T* x, int64_t rows, const T* m, T* a, T* b, int64_t C) {       \
    for (int64_t r = 0; r < rows; ++r) row_gradient_body(g + r * C, x + r * C, m, a, b, C);                       \
  }                                                                                                               \
  PSQ_CLONES void run_affine(T* out, const T* g, const T* x, int64_t len, T k, T a, T m, T b) {                  \
    run_affine_body(out, g, x, len, k, a, m, b);                                                                  \
  }                                                                                                               \
  PSQ_CLONES void rows_affine(T* out, const T* g, const T* x, int64_t rows, int64_t C, const T* k, const T* a,   \
                              const T* m, const T* b) {                                                           \
    for (int64_t r = 0; r < rows; ++r)                                                                            \
      row_affine_body(out + r * C, g == nullptr ? nullptr : g + r * C, x + r * C, C, k, a, m, b);                 \
  }

PSQ_LOOPS(float)
PSQ_LOOPS(double)

// Row chunks for the channels-last reductions: each thread sums its own, then they are added.
int64_t chunks_for(const Layout& L) {
  const int64_t by_size = std::max<int64_t>(1, L.rows() * L.c / kGrain);
  return std::min<int64_t>({by_size, static_cast<int64_t>(at::get_num_threads()), L.rows()});
}

int64_t channel_grain(const Layout& L) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, L.rows())); }

// Channels-last: per channel, the sums `add(rows of a block, a, b)` takes in T over blocks of
// rows, added up in double (each thread its own rows).
template <typename T, typename Add>
void row_sums(const Layout& L, Per& s1, Per& s2, const Add& add) {
  const int64_t C = L.c, parts = chunks_for(L), rows = L.rows();
  std::vector<Per> a(parts, Per(C, 0.0)), b(parts, Per(C, 0.0));
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ta(C), tb(C);
    for (int64_t part = begin; part < end; ++part) {
      const int64_t stop = rows * (part + 1) / parts;
      for (int64_t r = rows * part / parts; r < stop; r += kBlock / 4) {
        std::fill(ta.begin(), ta.end(), T(0)), std::fill(tb.begin(), tb.end(), T(0));
        add(r, std::min<int64_t>(kBlock / 4, stop - r), ta.data(), tb.data());
        for (int64_t c = 0; c < C; ++c) a[part][c] += ta[c], b[part][c] += tb[c];
      }
    }
  });
  s1.assign(C, 0.0), s2.assign(C, 0.0);
  for (int64_t part = 0; part < parts; ++part)
    for (int64_t c = 0; c < C; ++c) s1[c] += a[part][c], s2[c] += b[part][c];
}

// Per channel: Σ(x − k) and Σ(x − k)², with k the channel's first value (a shift that keeps the
// one-pass variance from cancelling), and the shift itself.
template <typename T>
void shifted_sums(const T* x, const Layout& L, Per& k, Per& s1, Per& s2) {
  const int64_t C = L.c;
  k.assign(C, 0.0), s1.assign(C, 0.0), s2.assign(C, 0.0);
  if (!L.last) {
    at::parallel_for(0, C, channel_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const T shift = x[c * L.inner];
        double a = 0.0, b = 0.0;
        for (int64_t i = 0; i < L.n; ++i) run_moments(x + (i * C + c) * L.inner, L.inner, shift, a, b);
        k[c] = shift, s1[c] = a, s2[c] = b;
      }
    });
    return;
  }
  const std::vector<T> shift(x, x + C);
  k.assign(shift.begin(), shift.end());
  row_sums<T>(L, s1, s2, [&](int64_t r, int64_t rows, T* a, T* b) { rows_moments(x + r * C, rows, shift.data(), a, b, C); });
}

// Per channel: Σg and Σg·(x − m).
template <typename T>
void gradient_sums(const T* g, const T* x, const Layout& L, const Per& m, Per& s1, Per& s2) {
  const int64_t C = L.c;
  s1.assign(C, 0.0), s2.assign(C, 0.0);
  if (!L.last) {
    at::parallel_for(0, C, channel_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double a = 0.0, b = 0.0;
        for (int64_t i = 0; i < L.n; ++i) {
          const int64_t at = (i * C + c) * L.inner;
          run_gradient(g + at, x + at, L.inner, static_cast<T>(m[c]), a, b);
        }
        s1[c] = a, s2[c] = b;
      }
    });
    return;
  }
  const std::vector<T> center(m.begin(), m.end());
  row_sums<T>(L, s1, s2, [&](int64_t r, int64_t rows, T* a, T* b) {
    rows_gradient(g + r * C, x + r * C, rows, center.data(), a, b, C);
  });
}

// out = k·g + a·(x − m) + b per channel (g may be null: then out = a·(x − m) + b).
template <typename T>
void affine(T* out, const T* g, const T* x, const Layout& L, const Per& k, const Per& a, const Per& m, const Per& b) {
  const int64_t C = L.c;
  const std::vector<T> tk(k.begin(), k.end()), ta(a.begin(), a.end()), tm(m.begin(), m.end()), tb(b.begin(), b.end());
  if (!L.last) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, L.inner));
    at::parallel_for(0, L.n * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t c = block % C, at = block * L.inner;
        run_affine(out + at, g == nullptr ? nullptr : g + at, x + at, L.inner, tk[c], ta[c], tm[c], tb[c]);
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrain / C);
  at::parallel_for(0, L.rows(), grain, [&](int64_t begin, int64_t end) {
    const int64_t at = begin * C;
    rows_affine(out + at, g == nullptr ? nullptr : g + at, x + at, end - begin, C, tk.data(), ta.data(), tm.data(),
                tb.data());
  });
}

Per values(const Tensor& t, int64_t c) {
  const Tensor d = t.contiguous();
  Per out(c);
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "psq_values", [&] {
    const scalar_t* p = d.data_ptr<scalar_t>();
    std::copy(p, p + c, out.begin());
  });
  return out;
}

Per values(const c10::optional<Tensor>& t, int64_t c, double absent) {
  return t.has_value() && t->defined() ? values(*t, c) : Per(c, absent);
}

Tensor tensor_of(const Per& v, const Tensor& like) {
  Tensor out = at::empty({static_cast<int64_t>(v.size())}, like.options());
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "psq_tensor_of",
                             [&] { std::copy(v.begin(), v.end(), out.data_ptr<scalar_t>()); });
  return out;
}

void check_input(const Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "psq_native: ", what, " must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "psq_native: ", what,
              " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5 && x.numel() > 0, "psq_native: ", what,
              " must be a non-empty (N, C, ...) tensor of 2 to 5 dimensions, got ", x.sizes());
}

void check_channels(const c10::optional<Tensor>& t, int64_t c, const char* what) {
  if (t.has_value() && t->defined())
    TORCH_CHECK(t->numel() == c, "psq_native: ", what, " must have ", c, " values, got ", t->numel());
}

// The forward's per-channel results: the blended mean and variance, the batch's.
struct Moments {
  Per mean, var, mean_b, var_b;
};

// y (into `y`, x's layout) and the moments, from per-channel inputs already checked.
Moments forward_core(const Tensor& x, Tensor& y, const Per& w, const Per& b, const Per& hm, const Per& hv,
                     double share, double eps) {
  const Layout L = layout_of(x);
  const int64_t C = L.c;
  Per k, s1, s2;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psq_forward_moments",
                             [&] { shifted_sums(x.data_ptr<scalar_t>(), L, k, s1, s2); });
  const double n = L.count();
  Moments m{Per(C), Per(C), Per(C), Per(C)};
  Per scale(C), none(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const double d = s1[c] / n;
    m.mean_b[c] = k[c] + d;
    m.var_b[c] = std::max(s2[c] / n - d * d, 0.0);
    const double delta = m.mean_b[c] - hm[c];
    m.mean[c] = share ? m.mean_b[c] + share * (hm[c] - m.mean_b[c]) : m.mean_b[c];
    m.var[c] = share ? m.var_b[c] + share * (hv[c] - m.var_b[c]) + share * (1.0 - share) * delta * delta : m.var_b[c];
    scale[c] = w[c] / std::sqrt(m.var[c] + eps);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psq_forward_output", [&] {
    affine<scalar_t>(y.data_ptr<scalar_t>(), nullptr, x.data_ptr<scalar_t>(), L, none, scale, m.mean, b);
  });
  return m;
}

// Returns y, the blended mean and variance, the batch's mean and variance.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward(const Tensor& x_in, const c10::optional<Tensor>& weight,
                                                           const c10::optional<Tensor>& bias,
                                                           const c10::optional<Tensor>& history_mean,
                                                           const c10::optional<Tensor>& history_var, double share,
                                                           double eps) {
  check_input(x_in, "x");
  const Tensor x = channels_last(x_in) ? x_in : x_in.contiguous();
  const int64_t C = x.size(1);
  for (auto [t, what] : {std::pair{&weight, "weight"}, {&bias, "bias"}, {&history_mean, "history mean"},
                         {&history_var, "history var"}})
    check_channels(*t, C, what);
  TORCH_CHECK(share == 0.0 || (history_mean.has_value() && history_var.has_value()),
              "psq_native: a share of history needs the history");
  Tensor y = at::empty_like(x);
  const Moments m = forward_core(x, y, values(weight, C, 1.0), values(bias, C, 0.0), values(history_mean, C, 0.0),
                                 values(history_var, C, 0.0), share, eps);
  return {y, tensor_of(m.mean, x), tensor_of(m.var, x), tensor_of(m.mean_b, x), tensor_of(m.var_b, x)};
}

// Modes of the backward (psq.kernels names them).
enum Mode : int64_t { kBatch = 0, kCluster = 1, kExact = 2, kRenorm = 3 };

// The backward's results: the input's gradient (if asked for), γ's and β's, and the batch's
// γ-free gradient means Σg/n and Σg·x̂/n (x̂ about the blended statistics).
struct Gradients {
  Tensor x;
  Per weight, bias, dy, dy_xhat;
};

Gradients backward_core(const Tensor& g, const Tensor& x, const Per& w, const Moments& m, int64_t mode, double share,
                        double gradient_share, const Per& hdy, const Per& hdyx, double eps, bool input_gradient) {
  const Layout L = layout_of(x);
  const int64_t C = L.c;
  Per center(C), r_center(C), r(C);
  for (int64_t c = 0; c < C; ++c) r[c] = 1.0 / std::sqrt(m.var[c] + eps);
  if (mode == kRenorm) {  // the gradient through the batch's statistics: reduce about them
    for (int64_t c = 0; c < C; ++c) center[c] = m.mean_b[c], r_center[c] = 1.0 / std::sqrt(m.var_b[c] + eps);
  } else {
    center = m.mean, r_center = r;
  }
  Per s1, s2;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psq_backward_sums", [&] {
    gradient_sums(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), L, center, s1, s2);
  });
  const double n = L.count();
  Per k(C), a(C), b(C);
  Gradients out{Tensor(), Per(C), s1, Per(C), Per(C)};
  for (int64_t c = 0; c < C; ++c) {
    const double g_mean = s1[c] / n, gx_mean = s2[c] * r_center[c] / n;  // about the center
    out.weight[c] = r[c] * (s2[c] + (center[c] - m.mean[c]) * s1[c]);    // Σg·x̂, x̂ about μ, σ
    out.dy[c] = g_mean, out.dy_xhat[c] = out.weight[c] / n;
    double g_bar = g_mean, gx_bar = gx_mean;
    if (mode == kCluster) {
      g_bar = g_mean + gradient_share * (hdy[c] - g_mean);
      gx_bar = gx_mean + gradient_share * (hdyx[c] - gx_mean);
    } else if (mode == kExact) {
      g_bar *= 1.0 - share, gx_bar *= 1.0 - share;
    }
    k[c] = w[c] * r[c];
    a[c] = -k[c] * gx_bar * r_center[c];
    b[c] = -k[c] * g_bar;
  }
  if (input_gradient) {
    out.x = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psq_backward_input", [&] {
      affine<scalar_t>(out.x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), L, k, a, center,
                       b);
    });
  }
  return out;
}

// Returns the gradients of x, γ and β, and the batch's γ-free gradient means Σg/n and Σg·x̂/n
// (x̂ about the blended statistics).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& g_in, const Tensor& x_in, const c10::optional<Tensor>& weight, const Tensor& mean_t,
    const Tensor& var_t, const Tensor& mean_b_t, const Tensor& var_b_t, int64_t mode, double share,
    double gradient_share, const c10::optional<Tensor>& history_dy, const c10::optional<Tensor>& history_dy_xhat,
    double eps, bool input_gradient) {
  check_input(x_in, "x");
  TORCH_CHECK(g_in.sizes() == x_in.sizes() && g_in.scalar_type() == x_in.scalar_type(),
              "psq_native: the gradient must match x, got ", g_in.sizes(), " ", g_in.scalar_type());
  TORCH_CHECK(mode >= kBatch && mode <= kRenorm, "psq_native: unknown backward mode ", mode);
  TORCH_CHECK(mode != kCluster || (history_dy.has_value() && history_dy_xhat.has_value()),
              "psq_native: the cluster gradient needs the history's gradient means");
  const Tensor x = channels_last(x_in) ? x_in : x_in.contiguous();
  const int64_t C = x.size(1);
  for (auto [t, what] : {std::pair{&weight, "weight"}, {&history_dy, "history dy"},
                         {&history_dy_xhat, "history dy_xhat"}})
    check_channels(*t, C, what);
  const Moments m{values(mean_t, C), values(var_t, C), values(mean_b_t, C), values(var_b_t, C)};
  const Gradients out =
      backward_core(like(g_in, x), x, values(weight, C, 1.0), m, mode, share, gradient_share,
                    values(history_dy, C, 0.0), values(history_dy_xhat, C, 0.0), eps, input_gradient);
  return {out.x, tensor_of(out.weight, x), tensor_of(out.bias, x), tensor_of(out.dy, x), tensor_of(out.dy_xhat, x)};
}

// -- the training step as one autograd operator ------------------------------------------------
//
// A step's record of the layer is row `index` of `records` (psq.records): C values per part and
// a marker, [mean_b | var_b | dy | dy_xhat | state], in x's dtype.  The forward writes the
// batch's moments and sets the state to 0; the backward writes the batch's gradient means (if
// `keep_gradient`) only while the state is 0, then sets it to n, the elements per channel.  The
// loop seals a record it closes without them (state −1): a backward that comes later writes
// nothing there.  `history` is the layer's [mean | var | dy | dy_xhat] rows; it is read, never
// saved for autograd (psq reloads it in place: a constant).

Per row(const Tensor& t, int64_t at, int64_t c) {
  Per out(c);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "psq_row", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>() + at * c;
    std::copy(p, p + c, out.begin());
  });
  return out;
}

// Where one record begins, and its parts: records are rows of 4·C + 1 values.
struct Record {
  Tensor records;
  int64_t index, c;
  int64_t at(int64_t part) const { return index * (4 * c + 1) + part * c; }

  void write(int64_t part, const Per& a, const Per& b) const {
    AT_DISPATCH_FLOATING_TYPES(records.scalar_type(), "psq_record_write", [&] {
      scalar_t* p = records.data_ptr<scalar_t>() + at(part);
      std::copy(a.begin(), a.end(), p);
      std::copy(b.begin(), b.end(), p + c);
    });
  }
  double state() const {
    double s = 0.0;
    AT_DISPATCH_FLOATING_TYPES(records.scalar_type(), "psq_record_state",
                               [&] { s = records.data_ptr<scalar_t>()[at(4)]; });
    return s;
  }
  void set_state(double s) const {
    AT_DISPATCH_FLOATING_TYPES(records.scalar_type(), "psq_record_set_state",
                               [&] { records.data_ptr<scalar_t>()[at(4)] = static_cast<scalar_t>(s); });
  }
};

void check_train(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                 const c10::optional<Tensor>& history, const Tensor& records, int64_t index, double share,
                 double gradient_share, double eps, int64_t mode, bool keep_gradient) {
  check_input(x, "x");
  const int64_t C = x.size(1);
  for (auto [t, what] : {std::pair{&weight, "weight"}, {&bias, "bias"}}) {
    check_channels(*t, C, what);
    if (t->has_value() && (*t)->defined())
      TORCH_CHECK((*t)->scalar_type() == x.scalar_type() && (*t)->is_contiguous() && (*t)->device().is_cpu(),
                  "psq_native: ", what, " must be contiguous on the CPU in x's dtype");
  }
  // autograd numbers only the tensors given: a bias without a weight would take the weight's place
  TORCH_CHECK((weight.has_value() && weight->defined()) || !(bias.has_value() && bias->defined()),
              "psq_native: a bias needs a weight");
  TORCH_CHECK(share >= 0.0 && share <= 1.0 && gradient_share >= 0.0 && gradient_share <= 1.0,
              "psq_native: the shares must be in [0, 1], got ", share, " and ", gradient_share);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), "psq_native: eps must be a non-negative number, got ", eps);
  TORCH_CHECK(!keep_gradient || mode == kBatch || mode == kCluster,
              "psq_native: only the batch and cluster backwards keep their gradient means");
  const bool has_history = history.has_value() && history->defined();
  TORCH_CHECK(share == 0.0 || has_history, "psq_native: a share of history needs the history");
  if (has_history)
    TORCH_CHECK(history->numel() == 4 * C && history->is_contiguous() && history->scalar_type() == x.scalar_type() &&
                    history->device().is_cpu(),
                "psq_native: the history must be 4 contiguous rows of ", C, " values in x's dtype, got ",
                history->sizes(), " ", history->scalar_type());
  TORCH_CHECK(records.dim() == 2 && records.size(1) == 4 * C + 1 && records.is_contiguous() &&
                  records.scalar_type() == x.scalar_type() && records.device().is_cpu(),
              "psq_native: the records must be contiguous rows of 4·C + 1 = ", 4 * C + 1,
              " values in x's dtype, got ", records.sizes(), " ", records.scalar_type());
  TORCH_CHECK(index >= 0 && index < records.size(0), "psq_native: record ", index, " of ", records.size(0));
  TORCH_CHECK(mode >= kBatch && mode <= kRenorm, "psq_native: unknown backward mode ", mode);
  TORCH_CHECK(mode != kCluster || has_history, "psq_native: the cluster gradient needs the history's gradient means");
}

Per history_row(const c10::optional<Tensor>& history, int64_t at, int64_t c) {
  return history.has_value() && history->defined() ? row(*history, at, c) : Per(c, 0.0);
}

Tensor train_forward(const Tensor& x_in, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                     const c10::optional<Tensor>& history, const Record& record, double share, double eps,
                     Moments& m) {
  const Tensor x = channels_last(x_in) ? x_in : x_in.contiguous();
  const int64_t C = x.size(1);
  Tensor y = at::empty_like(x);
  m = forward_core(x, y, values(weight, C, 1.0), values(bias, C, 0.0), history_row(history, 0, C),
                   history_row(history, 1, C), share, eps);
  record.write(0, m.mean_b, m.var_b);
  record.set_state(0.0);
  return y;
}

class Train : public torch::autograd::Function<Train> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& bias, const c10::optional<Tensor>& history,
                        const Tensor& records, int64_t index, double share, double gradient_share, double eps,
                        int64_t mode, bool keep_gradient) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // no gradient from downstream: none here, no record written
    const int64_t C = x.size(1);
    Moments m;
    const Tensor xc = channels_last(x) ? x : x.contiguous();  // one copy of a strided input, for both
    Tensor y = train_forward(xc, weight, bias, history, Record{records, index, C}, share, eps, m);
    Tensor moments = at::empty({4, C}, x.options().dtype(at::kDouble));
    double* p = moments.data_ptr<double>();
    for (const Per* v : {&m.mean, &m.var, &m.mean_b, &m.var_b}) p = std::copy(v->begin(), v->end(), p);
    const Tensor w = weight.has_value() ? *weight : Tensor();
    ctx->save_for_backward({xc, w, moments});
    ctx->saved_data["history"] = history.has_value() ? *history : Tensor();
    ctx->saved_data["records"] = keep_gradient ? records : Tensor();
    ctx->saved_data["index"] = index;
    ctx->saved_data["share"] = share;
    ctx->saved_data["gradient_share"] = gradient_share;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["mode"] = mode;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "psq_native::train is differentiable once: for a double backward (create_graph=True), "
                "run the step on torch's kernels (psq.native.set_enabled(False))");
    if (!grads[0].defined()) return torch::autograd::variable_list(11);
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    const int64_t C = x.size(1);
    const double* p = saved[2].data_ptr<double>();
    const Moments m{Per(p, p + C), Per(p + C, p + 2 * C), Per(p + 2 * C, p + 3 * C), Per(p + 3 * C, p + 4 * C)};
    const Tensor history = ctx->saved_data["history"].toTensor();
    const c10::optional<Tensor> h = history.defined() ? c10::optional<Tensor>(history) : c10::nullopt;
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const Tensor g = like(grads[0], x);
    const Gradients out = backward_core(
        g, x, weight.defined() ? values(weight, C) : Per(C, 1.0), m, mode, ctx->saved_data["share"].toDouble(),
        ctx->saved_data["gradient_share"].toDouble(), mode == kCluster ? history_row(h, 2, C) : Per(C, 0.0),
        mode == kCluster ? history_row(h, 3, C) : Per(C, 0.0), ctx->saved_data["eps"].toDouble(),
        ctx->needs_input_grad(0));
    const Record record{ctx->saved_data["records"].toTensor(), ctx->saved_data["index"].toInt(), C};
    if (record.records.defined() && record.state() == 0.0) {  // the first backward of an open record
      record.write(2, out.dy, out.dy_xhat);
      std::atomic_thread_fence(std::memory_order_release);  // the means before the state that says so
      record.set_state(layout_of(x).count());
    }
    const bool affine = weight.defined();
    return {out.x,
            affine && ctx->needs_input_grad(1) ? tensor_of(out.weight, x) : Tensor(),
            affine && ctx->needs_input_grad(2) ? tensor_of(out.bias, x) : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor train(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
             const c10::optional<Tensor>& history, const Tensor& records, int64_t index, double share,
             double gradient_share, double eps, int64_t mode, bool keep_gradient) {
  check_train(x, weight, bias, history, records, index, share, gradient_share, eps, mode, keep_gradient);
  return Train::apply(x, weight, bias, history, records, index, share, gradient_share, eps, mode, keep_gradient);
}

// Below autograd (no gradient to record): the forward alone.
Tensor train_no_grad(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                     const c10::optional<Tensor>& history, const Tensor& records, int64_t index, double share,
                     double gradient_share, double eps, int64_t mode, bool keep_gradient) {
  check_train(x, weight, bias, history, records, index, share, gradient_share, eps, mode, keep_gradient);
  Moments m;
  return train_forward(x, weight, bias, history, Record{records, index, x.size(1)}, share, eps, m);
}

}  // namespace

TORCH_LIBRARY(psq_native, m) {
  m.def(
      "forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? history_mean, Tensor? history_var, float share, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor g, Tensor x, Tensor? weight, Tensor mean, Tensor var, Tensor mean_b, Tensor var_b, int mode, "
      "float share, float gradient_share, Tensor? history_dy, Tensor? history_dy_xhat, float eps, "
      "bool input_gradient) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "train(Tensor x, Tensor? weight, Tensor? bias, Tensor? history, Tensor(a!) records, int index, float share, "
      "float gradient_share, float eps, int mode, bool keep_gradient) -> Tensor");
  m.impl("forward", c10::DispatchKey::CPU, &forward);
  m.impl("backward", c10::DispatchKey::CPU, &backward);
  m.impl("train", c10::DispatchKey::CPU, &train_no_grad);
}

TORCH_LIBRARY_IMPL(psq_native, Autograd, m) { m.impl("train", &train); }
