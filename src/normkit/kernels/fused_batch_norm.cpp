// Why this file exists: BatchNorm's options (renorm, ghost batches, padding masks) as one CPU
// forward and one backward kernel, so small inputs pay two kernel calls instead of twenty.
//
// The input is seen as an (N, R, C, S) contiguous array: N samples, R rows per sample, C
// features, S positions per feature (NCHW data: R = 1, S = H*W; channels-last and (N, T, C)
// data: R = H*W or T, S = 1). Ghost group of sample n: n % G (Keras' strided layout) or
// n / (N / G) (contiguous). A padding mask, when given, holds one flag per (n, r, s).
// Statistics accumulate in double around a shift (the first valid value of each feature in each
// ghost group), so float32 data far from zero keeps an exact variance; see reference.py for the math.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Indices into the vector of numbers the Python side passes.
enum Setting { kFactor, kRenormFactor, kRmin, kRmax, kDmax, kEps, kUnbiased, kUpdate, kSettings };

struct Layout {
  int64_t N, R, C, S, G;
  bool strided;
  int64_t group_of(int64_t n) const { return G == 1 ? 0 : (strided ? n % G : n / (N / G)); }
};

Layout layout_from(const std::vector<int64_t>& dims) {
  TORCH_CHECK(dims.size() == 6, "normkit fused kernel: dims must be (N, R, C, S, groups, strided)");
  return Layout{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5] != 0};
}

// Rows of C values (S = 1, one group) walked as blocks of k whole rows holding at least 32
// values: per-position arrays tiled k times make the inner loops long enough to vectorize when
// C is small (channels-last data with a few channels, where torch.nn's kernels are slowest).
struct RowBlocks {
  int64_t C, k, width, blocks, tail;
  RowBlocks(int64_t rows, int64_t channels)
      : C(channels), k(channels >= 32 ? 1 : (32 + channels - 1) / channels), width(k * channels),
        blocks(rows / k), tail((rows % k) * channels) {}
  std::vector<double> tile(const double* per_channel) const {
    std::vector<double> tiled(width);
    for (int64_t i = 0; i < width; ++i) tiled[i] = per_channel[i % C];
    return tiled;
  }
  void fold(const std::vector<double>& tiled, double* per_channel) const {
    for (int64_t i = 0; i < width; ++i) per_channel[i % C] += tiled[i];
  }
  // body(offset, length) over every block, then over the rows left (a partial block).
  template <typename Body>
  void for_each(Body body) const {
    for (int64_t b = 0; b < blocks; ++b) body(b * width, width);
    if (tail > 0) body(blocks * width, tail);
  }
};

// Per-(group, feature) count, mean and biased variance; counts are per group (masks do not
// depend on the feature).
template <typename scalar_t>
void group_moments(const scalar_t* x, const bool* valid, const Layout& L, std::vector<double>& count,
                   std::vector<double>& mean, std::vector<double>& var) {
  const int64_t C = L.C, S = L.S;
  count.assign(L.G, 0.0);
  // Each ghost group is shifted by its own first valid value: groups are independent batches (a
  // NaN stays in its group, and groups far apart keep exact variances). A non-finite value is no
  // shift (inf - inf would turn an infinite mean into NaN).
  std::vector<double> shift(L.G * C, 0.0), sum(L.G * C, 0.0), sumsq(L.G * C, 0.0);
  std::vector<char> shifted(L.G, 0);
  const int64_t per_sample = L.R * S;
  for (int64_t n = 0, left = L.G; n < L.N && left > 0; ++n) {
    const int64_t g = L.group_of(n);
    if (shifted[g]) continue;
    for (int64_t p = n * per_sample; p < (n + 1) * per_sample; ++p) {
      if (valid != nullptr && !valid[p]) continue;
      const int64_t row = p / S, s = p % S;
      for (int64_t c = 0; c < C; ++c) {
        const double v = static_cast<double>(x[(row * C + c) * S + s]);
        shift[g * C + c] = std::isfinite(v) ? v : 0.0;
      }
      shifted[g] = 1;
      --left;
      break;
    }
  }
  if (S == 1 && L.G == 1 && valid == nullptr) {
    const RowBlocks blocks(L.N * L.R, C);
    const std::vector<double> shift_tiled = blocks.tile(shift.data());
    std::vector<double> block_sum(blocks.width, 0.0), block_sumsq(blocks.width, 0.0);
    const double* __restrict__ k = shift_tiled.data();
    double* __restrict__ su = block_sum.data();
    double* __restrict__ sq = block_sumsq.data();
    blocks.for_each([&](int64_t offset, int64_t length) {
      const scalar_t* __restrict__ xb = x + offset;
      for (int64_t i = 0; i < length; ++i) {
        const double v = static_cast<double>(xb[i]) - k[i];
        su[i] += v;
        sq[i] += v * v;
      }
    });
    blocks.fold(block_sum, sum.data());
    blocks.fold(block_sumsq, sumsq.data());
    count[0] = static_cast<double>(L.N * L.R);
  } else {
  for (int64_t n = 0; n < L.N; ++n) {
    const int64_t g = L.group_of(n);
    const double* shift_g = shift.data() + g * C;
    double* su = sum.data() + g * C;
    double* sq = sumsq.data() + g * C;
    for (int64_t r = 0; r < L.R; ++r) {
      const int64_t row = n * L.R + r;
      const scalar_t* xr = x + row * C * S;
      const bool* vr = valid == nullptr ? nullptr : valid + row * S;
      if (S == 1) {
        if (vr != nullptr && !vr[0]) continue;
        count[g] += 1.0;
        for (int64_t c = 0; c < C; ++c) {
          const double v = static_cast<double>(xr[c]) - shift_g[c];
          su[c] += v;
          sq[c] += v * v;
        }
      } else {
        int64_t k_valid = S;
        if (vr != nullptr) {
          k_valid = 0;
          for (int64_t s = 0; s < S; ++s) k_valid += vr[s] ? 1 : 0;
          if (k_valid == 0) continue;
        }
        count[g] += static_cast<double>(k_valid);
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* xc = xr + c * S;
          const double k = shift_g[c];
          double a = 0.0, b = 0.0;
          _Pragma("omp simd reduction(+ : a, b)")  // sums in any order: vectorized
          for (int64_t s = 0; s < S; ++s) {
            // (a padded position adds 0; vr == nullptr is loop-invariant, unswitched by the compiler)
            const double v = (vr == nullptr || vr[s]) ? static_cast<double>(xc[s]) - k : 0.0;
            a += v;
            b += v * v;
          }
          su[c] += a;
          sq[c] += b;
        }
      }
    }
  }
  }
  mean.assign(L.G * C, 0.0);
  var.assign(L.G * C, 0.0);
  for (int64_t g = 0; g < L.G; ++g) {
    const double n = count[g];
    if (n <= 0.0) continue;  // nothing valid: mean 0, variance 0 (as the composite path)
    for (int64_t c = 0; c < C; ++c) {
      const double m = sum[g * C + c] / n;
      mean[g * C + c] = shift[g * C + c] + m;
      var[g * C + c] = std::max(sumsq[g * C + c] / n - m * m, 0.0);
    }
  }
}

// y = (x - mean_gc) * a_gc + offset_c, with a_gc = invstd_gc * scale_c (double arithmetic).
template <typename scalar_t>
void normalize(const scalar_t* x, scalar_t* y, const Layout& L, const std::vector<double>& mean,
               const std::vector<double>& slope, const std::vector<double>& offset) {
  const int64_t C = L.C, S = L.S;
  if (S == 1 && L.G == 1) {
    const RowBlocks blocks(L.N * L.R, C);
    const std::vector<double> m_tiled = blocks.tile(mean.data()), a_tiled = blocks.tile(slope.data()),
                              o_tiled = blocks.tile(offset.data());
    const double *__restrict__ m = m_tiled.data(), *__restrict__ a = a_tiled.data(), *__restrict__ o = o_tiled.data();
    blocks.for_each([&](int64_t start, int64_t length) {
      const scalar_t* __restrict__ xb = x + start;
      scalar_t* __restrict__ yb = y + start;
      for (int64_t i = 0; i < length; ++i) yb[i] = static_cast<scalar_t>((static_cast<double>(xb[i]) - m[i]) * a[i] + o[i]);
    });
    return;
  }
  for (int64_t n = 0; n < L.N; ++n) {
    const int64_t g = L.group_of(n);
    const double* m = mean.data() + g * C;
    const double* a = slope.data() + g * C;
    for (int64_t r = 0; r < L.R; ++r) {
      const int64_t base = (n * L.R + r) * C * S;
      const scalar_t* xr = x + base;
      scalar_t* yr = y + base;
      if (S == 1) {
        for (int64_t c = 0; c < C; ++c)
          yr[c] = static_cast<scalar_t>((static_cast<double>(xr[c]) - m[c]) * a[c] + offset[c]);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const double mc = m[c], ac = a[c], oc = offset[c];
          const scalar_t* xc = xr + c * S;
          scalar_t* yc = yr + c * S;
          for (int64_t s = 0; s < S; ++s) yc[s] = static_cast<scalar_t>((static_cast<double>(xc[s]) - mc) * ac + oc);
        }
      }
    }
  }
}

template <typename scalar_t>
scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

using Optional = c10::optional<Tensor>;

Tensor or_undefined(const Optional& t) { return t.has_value() ? *t : Tensor(); }

// The gradient with a graph (create_graph=True), from Python: normkit.kernels.graph_backward, which the
// Triton kernels' backward calls too. One entry per forward argument (11), as backward returns.
variable_list graph_backward(const Tensor& x, const Tensor& weight, const Tensor& valid, const std::vector<int64_t>& dims,
                             double eps, const Tensor& r, const Tensor& d, const Tensor& grad, bool need_input,
                             bool need_weight, bool need_bias) {
  pybind11::gil_scoped_acquire gil;
  auto as_object = [](const Tensor& t) { return t.defined() ? pybind11::cast(t) : pybind11::none(); };
  pybind11::tuple found = pybind11::module_::import("normkit.kernels").attr("graph_backward")(
      x, as_object(weight), as_object(valid), dims, eps, r, d, grad, pybind11::make_tuple(need_input, need_weight, need_bias));
  auto as_tensor = [&](int i) { return found[i].is_none() ? Tensor() : found[i].cast<Tensor>(); };
  return {as_tensor(0), as_tensor(1), as_tensor(2), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
          Tensor(), Tensor()};
}

struct FusedBatchNorm : public torch::autograd::Function<FusedBatchNorm> {
  // Returns the normalized input; moves the running buffers in place when settings[kUpdate].
  // Absent tensors are empty optionals: autograd then does not count them as inputs.
  static Tensor forward(AutogradContext* ctx, Tensor x, Optional weight_, Optional bias_, Optional valid_,
                        Optional running_mean_, Optional running_var_, Optional renorm_mean_,
                        Optional renorm_stddev_, Optional moving_stddev_, std::vector<int64_t> dims,
                        std::vector<double> settings) {
    Tensor weight = or_undefined(weight_), bias = or_undefined(bias_), valid = or_undefined(valid_);
    Tensor running_mean = or_undefined(running_mean_), running_var = or_undefined(running_var_);
    Tensor renorm_mean = or_undefined(renorm_mean_), renorm_stddev = or_undefined(renorm_stddev_);
    Tensor moving_stddev = or_undefined(moving_stddev_);
    TORCH_CHECK(settings.size() == kSettings, "normkit fused kernel: wrong number of settings");
    const Layout L = layout_from(dims);
    const int64_t C = L.C;
    const double eps = settings[kEps];
    const bool renorm = renorm_mean.defined();
    // (dtype, device, memory and size of x, parameters and buffers: checked by supported() first)
    TORCH_CHECK(!renorm || (renorm_stddev.defined() && (!running_mean.defined() || moving_stddev.defined())),
                "normkit fused kernel: renorm needs renorm_stddev (and moving_stddev when updating)");
    TORCH_CHECK(!valid.defined() || (valid.scalar_type() == torch::kBool && valid.numel() == L.N * L.R * L.S &&
                                     valid.is_contiguous() && L.G == 1),
                "normkit fused kernel: the mask must be contiguous booleans, one per (n, r, s), without ghost groups");
    TORCH_CHECK(x.numel() == L.N * L.R * C * L.S && L.G >= 1 && L.N % L.G == 0, "normkit fused kernel: bad dims");
    Tensor y = torch::empty_like(x);
    std::vector<double> count, mean, var, scale(C, 1.0), r(C, 1.0), d(C, 0.0), offset(C, 0.0);
    std::vector<double> slope(L.G * C), invstd(L.G * C);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normkit_fused_batch_norm", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      group_moments<scalar_t>(xp, valid.defined() ? valid.data_ptr<bool>() : nullptr, L, count, mean, var);
      const scalar_t* w = data_or_null<scalar_t>(weight);
      const scalar_t* b = data_or_null<scalar_t>(bias);
      // Batch statistics: the plain average of the groups' (equal counts).
      std::vector<double> batch_mean(C, 0.0), batch_var(C, 0.0);
      for (int64_t g = 0; g < L.G; ++g)
        for (int64_t c = 0; c < C; ++c) {
          batch_mean[c] += mean[g * C + c] / L.G;
          batch_var[c] += var[g * C + c] / L.G;
        }
      scalar_t* rm = data_or_null<scalar_t>(renorm_mean);
      scalar_t* rs = data_or_null<scalar_t>(renorm_stddev);
      const double floor_stddev = std::sqrt(eps);
      for (int64_t c = 0; c < C; ++c) {
        if (renorm) {  // r and d from the renorm statistics before this step's update
          const double safe = std::max(static_cast<double>(rs[c]), floor_stddev);
          r[c] = std::min(std::max(std::sqrt(batch_var[c] + eps) / safe, settings[kRmin]), settings[kRmax]);
          d[c] = std::min(std::max((batch_mean[c] - static_cast<double>(rm[c])) / safe, -settings[kDmax]),
                          settings[kDmax]);
        }
        const double gamma = w == nullptr ? 1.0 : static_cast<double>(w[c]);
        scale[c] = gamma * r[c];
        offset[c] = gamma * d[c] + (b == nullptr ? 0.0 : static_cast<double>(b[c]));
      }
      for (int64_t i = 0; i < L.G * C; ++i) {
        invstd[i] = 1.0 / std::sqrt(var[i] + eps);
        slope[i] = invstd[i] * scale[i % C];
      }
      normalize<scalar_t>(xp, y.data_ptr<scalar_t>(), L, mean, slope, offset);
      double total = 0.0;
      for (double n : count) total += n;
      if (settings[kUpdate] != 0.0 && running_mean.defined() && total > 0.0) {
        const double n = count[0];
        const double bessel = (settings[kUnbiased] != 0.0 && n > 1.0) ? n / (n - 1.0) : 1.0;
        const double f = settings[kFactor], rf = settings[kRenormFactor];
        scalar_t* mu = running_mean.data_ptr<scalar_t>();
        scalar_t* sigma2 = running_var.data_ptr<scalar_t>();
        scalar_t* ms = data_or_null<scalar_t>(moving_stddev);
        // (1 - f) old + f new, torch.nn's form: old + f (new - old) made a buffer that had overflowed to inf NaN at
        // the next step, where torch.nn's stays inf.
        auto blend = [](scalar_t& buffer, double target, double factor) {
          buffer = static_cast<scalar_t>((1.0 - factor) * static_cast<double>(buffer) + factor * target);
        };
        for (int64_t c = 0; c < C; ++c) {
          const double estimate = batch_var[c] * bessel;
          blend(mu[c], batch_mean[c], f);
          if (renorm) {
            blend(rm[c], batch_mean[c], rf);
            blend(rs[c], std::sqrt(batch_var[c] + eps), rf);
            blend(ms[c], std::sqrt(estimate + eps), f);
            const double stddev = static_cast<double>(ms[c]);
            sigma2[c] = static_cast<scalar_t>(std::max(stddev * stddev - eps, 0.0));
          } else {
            blend(sigma2[c], estimate, f);
          }
        }
      }
    });
    // Everything backward needs, in one double tensor: count (G), mean (G*C), invstd (G*C), scale, r, d (C each).
    Tensor saved = torch::empty({L.G + 2 * L.G * C + 3 * C}, torch::dtype(torch::kFloat64));
    double* out = saved.data_ptr<double>();
    for (const auto* part : {&count, &mean, &invstd, &scale, &r, &d}) out = std::copy(part->begin(), part->end(), out);
    // A copy of the mask: the caller's own memory (the layers pass a view of the user's mask), which a user may refill
    // before the backward (one mask buffer for several micro-batches), where ATen's paths keep what they derived.
    ctx->save_for_backward({x, weight, valid.defined() ? valid.clone() : valid});
    ctx->saved_data["dims"] = dims;
    ctx->saved_data["statistics"] = saved;
    ctx->saved_data["has_bias"] = bias.defined();
    ctx->saved_data["eps"] = eps;
    return y;
  }

  // dx = a g - w (slope (x - mean) + shift), slope = a invstd^2 sum(g (x - mean)) / n,
  // shift = a sum(g) / n, sums over every position of the group (each output depends on the
  // statistics), w = 1 on valid positions; dweight = r sum(g x_hat) + d sum(g), dbias = sum(g).
  // The padding rule (reference.normalize_backward): a position with g == 0 adds nothing to the sums
  // and a padded one gets a g alone, by selects, not products with 0: NaN or inf padding that the loss
  // ignores stays out (0 * NaN is NaN). Selects of values computed unconditionally, which the loops
  // vectorize as blends when built with -fno-trapping-math (normkit.kernels.build: under GCC's default the
  // product may not be computed where it is discarded, the sum loop stayed scalar, the step 27% slower).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    Tensor x = saved[0], weight = saved[1], valid = saved[2];
    const Layout L = layout_from(ctx->saved_data["dims"].toIntVector());
    const int64_t C = L.C, S = L.S;
    Tensor grad = grad_outputs[0].contiguous();
    const Tensor statistics = ctx->saved_data["statistics"].toTensor();
    const double* packed = statistics.data_ptr<double>();
    const int64_t GC = L.G * C;
    const double *count = packed, *mean = count + L.G, *invstd = mean + GC, *scale = invstd + GC, *r = scale + C,
                 *d = r + C;
    // needs_input_grad counts the tensors given, not the arguments: bias is input 1 without a weight.
    const bool need_input = ctx->needs_input_grad(0);
    const bool need_weight = weight.defined() && ctx->needs_input_grad(1);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(weight.defined() ? 2 : 1);
    if (torch::GradMode::is_enabled()) {
      // create_graph=True (a gradient penalty): the loops below write numbers, which autograd cannot
      // differentiate again, so normkit.kernels.graph_backward recomputes the step by autograd.
      return graph_backward(x, weight, valid, ctx->saved_data["dims"].toIntVector(),
                            ctx->saved_data["eps"].toDouble(), statistics.narrow(0, L.G + 2 * GC + C, C),
                            statistics.narrow(0, L.G + 2 * GC + 2 * C, C), grad_outputs[0], need_input, need_weight,
                            need_bias);
    }
    Tensor grad_input, grad_weight, grad_bias;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normkit_fused_batch_norm_backward", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = grad.data_ptr<scalar_t>();
      const bool* vp = valid.defined() ? valid.data_ptr<bool>() : nullptr;
      std::vector<double> sum_g(L.G * C, 0.0), sum_gx(L.G * C, 0.0);
      const bool row_blocks = S == 1 && L.G == 1;
      const RowBlocks blocks(L.N * L.R, C);
      std::vector<double> m_tiled;
      if (row_blocks) {
        m_tiled = blocks.tile(mean);
        std::vector<double> block_g(blocks.width, 0.0), block_gx(blocks.width, 0.0);
        const double* __restrict__ m = m_tiled.data();
        double* __restrict__ sg = block_g.data();
        double* __restrict__ sgx = block_gx.data();
        blocks.for_each([&](int64_t start, int64_t length) {
          const scalar_t* __restrict__ xb = xp + start;
          const scalar_t* __restrict__ gb = gp + start;
          for (int64_t i = 0; i < length; ++i) {
            const double gv = static_cast<double>(gb[i]);
            sg[i] += gv;
            const double term = gv * (static_cast<double>(xb[i]) - m[i]);
            sgx[i] += gv != 0.0 ? term : 0.0;
          }
        });
        blocks.fold(block_g, sum_g.data());
        blocks.fold(block_gx, sum_gx.data());
      }
      for (int64_t n = 0; n < (row_blocks ? 0 : L.N); ++n) {
        const int64_t g = L.group_of(n);
        const double* m = mean + g * C;
        double* sg = sum_g.data() + g * C;
        double* sgx = sum_gx.data() + g * C;
        for (int64_t rr = 0; rr < L.R; ++rr) {
          const int64_t base = (n * L.R + rr) * C * S;
          const scalar_t* xr = xp + base;
          const scalar_t* gr = gp + base;
          if (S == 1) {
            for (int64_t c = 0; c < C; ++c) {
              const double gv = static_cast<double>(gr[c]);
              sg[c] += gv;
              const double term = gv * (static_cast<double>(xr[c]) - m[c]);
              sgx[c] += gv != 0.0 ? term : 0.0;
            }
          } else {
            for (int64_t c = 0; c < C; ++c) {
              const scalar_t* xc = xr + c * S;
              const scalar_t* gc = gr + c * S;
              const double mc = m[c];
              double a = 0.0, b = 0.0;
              _Pragma("omp simd reduction(+ : a, b)")  // sums in any order: vectorized
              for (int64_t s = 0; s < S; ++s) {
                const double gv = static_cast<double>(gc[s]);
                a += gv;
                const double term = gv * (static_cast<double>(xc[s]) - mc);
                b += gv != 0.0 ? term : 0.0;
              }
              sg[c] += a;
              sgx[c] += b;
            }
          }
        }
      }
      if (need_input) {
        std::vector<double> a(L.G * C), slope(L.G * C, 0.0), shift(L.G * C, 0.0);
        for (int64_t i = 0; i < L.G * C; ++i) {
          const int64_t g = i / C;
          a[i] = invstd[i] * scale[i % C];
          if (count[g] > 0.0) {
            slope[i] = a[i] * invstd[i] * invstd[i] * sum_gx[i] / count[g];
            shift[i] = a[i] * sum_g[i] / count[g];
          }
        }
        grad_input = torch::empty_like(x);
        scalar_t* dx = grad_input.data_ptr<scalar_t>();
        const bool dense_blocks = row_blocks && vp == nullptr;
        if (dense_blocks) {
          const std::vector<double> a_tiled = blocks.tile(a.data()), sl_tiled = blocks.tile(slope.data()),
                                    sh_tiled = blocks.tile(shift.data());
          const double *__restrict__ m = m_tiled.data(), *__restrict__ at = a_tiled.data(),
                       *__restrict__ sl = sl_tiled.data(), *__restrict__ sh = sh_tiled.data();
          blocks.for_each([&](int64_t start, int64_t length) {
            const scalar_t* __restrict__ xb = xp + start;
            const scalar_t* __restrict__ gb = gp + start;
            scalar_t* __restrict__ db = dx + start;
            for (int64_t i = 0; i < length; ++i) {
              const double centered = static_cast<double>(xb[i]) - m[i];
              db[i] = static_cast<scalar_t>(at[i] * static_cast<double>(gb[i]) - (sl[i] * centered + sh[i]));
            }
          });
        }
        for (int64_t n = 0; n < (dense_blocks ? 0 : L.N); ++n) {
          const int64_t g = L.group_of(n);
          const double* m = mean + g * C;
          const double* ag = a.data() + g * C;
          const double* sl = slope.data() + g * C;
          const double* sh = shift.data() + g * C;
          for (int64_t rr = 0; rr < L.R; ++rr) {
            const int64_t row = n * L.R + rr;
            const int64_t base = row * C * S;
            const scalar_t* xr = xp + base;
            const scalar_t* gr = gp + base;
            scalar_t* dr = dx + base;
            const bool* vr = vp == nullptr ? nullptr : vp + row * S;
            if (S == 1) {
              const bool valid_row = vr == nullptr || vr[0];
              for (int64_t c = 0; c < C; ++c) {
                const double correction = sl[c] * (static_cast<double>(xr[c]) - m[c]) + sh[c];
                dr[c] = static_cast<scalar_t>(ag[c] * static_cast<double>(gr[c]) - (valid_row ? correction : 0.0));
              }
            } else {
              for (int64_t c = 0; c < C; ++c) {
                const scalar_t* xc = xr + c * S;
                const scalar_t* gc = gr + c * S;
                scalar_t* dc = dr + c * S;
                const double mc = m[c], ac = ag[c], slc = sl[c], shc = sh[c];
                for (int64_t s = 0; s < S; ++s) {
                  const bool valid_position = vr == nullptr || vr[s];
                  const double correction = slc * (static_cast<double>(xc[s]) - mc) + shc;
                  dc[s] = static_cast<scalar_t>(ac * static_cast<double>(gc[s]) - (valid_position ? correction : 0.0));
                }
              }
            }
          }
        }
      }
      if (need_weight || need_bias) {
        std::vector<double> grad_scale(C, 0.0), grad_offset(C, 0.0);
        for (int64_t i = 0; i < L.G * C; ++i) {
          grad_scale[i % C] += invstd[i] * sum_gx[i];
          grad_offset[i % C] += sum_g[i];
        }
        if (need_weight) {
          grad_weight = torch::empty_like(weight);
          scalar_t* gw = grad_weight.data_ptr<scalar_t>();
          for (int64_t c = 0; c < C; ++c)
            gw[c] = static_cast<scalar_t>(r[c] * grad_scale[c] + d[c] * grad_offset[c]);
        }
        if (need_bias) {
          grad_bias = torch::empty({C}, x.options());
          scalar_t* gb = grad_bias.data_ptr<scalar_t>();
          for (int64_t c = 0; c < C; ++c) gb[c] = static_cast<scalar_t>(grad_offset[c]);
        }
      }
    });
    // One entry per forward argument (11).
    return {grad_input, grad_weight, grad_bias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor()};
  }
};

// Whether the kernel takes this call: float32/float64 CPU tensors, x contiguous with the dims'
// size, parameters and buffers contiguous with C values of x's dtype.
bool supported(const Tensor& x, const std::vector<const Optional*>& others, int64_t channels) {
  if (!x.device().is_cpu() || !x.is_contiguous() ||
      (x.scalar_type() != torch::kFloat32 && x.scalar_type() != torch::kFloat64))
    return false;
  for (const Optional* t : others) {
    if (t->has_value() && ((*t)->numel() != channels || !(*t)->is_contiguous() ||
                           (*t)->scalar_type() != x.scalar_type() || !(*t)->device().is_cpu()))
      return false;
  }
  return true;
}

// The normalized x, or None (nothing done) when the call is not one the kernel takes.
c10::optional<Tensor> fused_batch_norm(Tensor x, Optional weight, Optional bias, Optional valid,
                                       Optional running_mean, Optional running_var, Optional renorm_mean,
                                       Optional renorm_stddev, Optional moving_stddev, std::vector<int64_t> dims,
                                       std::vector<double> settings) {
  if (dims.size() != 6 ||
      !supported(x, {&weight, &bias, &running_mean, &running_var, &renorm_mean, &renorm_stddev, &moving_stddev},
                 dims[2]))
    return c10::nullopt;
  return FusedBatchNorm::apply(x, weight, bias, valid, running_mean, running_var, renorm_mean, renorm_stddev,
                               moving_stddev, dims, settings);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_batch_norm", &fused_batch_norm, "BatchNorm with renorm / ghost groups / padding mask, fused (CPU)");
}
