// The rescaling t ⊙ p(r) of an adaptive layer whose importance distribution is the discretised
// exponential (Errica et al. 2025, the rescaling h * p), as one autograd node on the CPU.
//
// Why compiled: on the paper's small networks a training step costs per graph node and per Python
// call, not per flop. In PyTorch operations the rescaling is p(r) from its closed form on the host,
// a linearisation p + dp/dr (r - r_value) for the gradient to r, and the product: five graph nodes and
// a dozen host operations per layer and step (distributions.Exponential.importance). Here it is one
// node forward and one backward, with the same values: bench/bench_adaptive.py measures both paths.
//
// Loaded, and built on first use, by cpu_kernel.py; tests/methods/adaptive/test_aw_cpu_kernel.py
// checks it against the PyTorch path.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr double kEps = 1e-6;         // distributions.EPS
constexpr double kLamOffset = 1e-32;  // distributions.LAM_OFFSET
constexpr int64_t kGrain = 16384;     // elements per thread before at::parallel_for splits the work
constexpr int64_t kFlushRows = 256;   // rows summed in the layer's dtype before adding in float64

// p_i and dp_i/dr for i < D, normalised over n >= D units, at raw rate r: the closed form of
// distributions._host_importance, in the same order of operations. With lam = softplus(r) + 1e-32,
// rho = e^-lam, c = 1 - rho, S = 1 - rho^n + n eps, dS/dlam = n rho^n:
//     p_i = rho^i c / S + eps / S,    dp_i/dlam = rho^i (a - b i) - g,
//     a = (rho - c dS / S) / S,  b = c / S,  g = eps dS / S^2;   dp/dr = dp/dlam sigmoid(r).
// p is written in the layer's dtype T, rounded once from float64 as the PyTorch path rounds its p.
template <typename T>
void exponential_importance(double r, int64_t D, int64_t n, T* p, double* dp) {
  double lam, dlam_dr;
  if (r > 20.0) {  // torch's softplus is the identity above its threshold 20
    lam = r;
    dlam_dr = 1.0;
  } else {
    lam = std::log1p(std::exp(r));
    dlam_dr = r >= 0 ? 1.0 / (1.0 + std::exp(-r)) : std::exp(r) / (1.0 + std::exp(r));
  }
  lam += kLamOffset;
  const double rho = std::exp(-lam), c = -std::expm1(-lam);
  const double S = -std::expm1(-lam * n) + n * kEps;
  const double dS = n * std::exp(-lam * n);
  const double slope = -c / S * dlam_dr, offset = (rho - c * dS / S) / S * dlam_dr;
  const double shift = kEps * dS / (S * S) * dlam_dr;
  for (int64_t i = 0; i < D; ++i) {
    const double e = std::exp(i * -lam);  // rho^i
    dp[i] = (i * slope + offset) * e - shift;
    p[i] = static_cast<T>(e * (c / S) + kEps / S);
  }
}

// The unit axis splits a contiguous tensor into (outer, D, inner) blocks.
struct Blocks {
  int64_t outer, D, inner;
};

Blocks blocks_of(const torch::Tensor& t, int64_t dim) {
  int64_t inner = 1;
  for (int64_t k = dim + 1; k < t.dim(); ++k) inner *= t.size(k);
  const int64_t D = t.size(dim);
  return {D * inner == 0 ? 0 : t.numel() / (D * inner), D, inner};
}

int64_t grain_rows(const Blocks& b) { return std::max<int64_t>(kGrain / std::max<int64_t>(b.D * b.inner, 1), 1); }

// One row (o fixed: D units times `inner` elements) of out = t p. Restrict-qualified so that the
// compiler vectorises: along the units when inner == 1 (Linear layers), else along H W of a unit.
template <typename T>
void scale_row(const T* __restrict__ t, const T* __restrict__ p, T* __restrict__ out, int64_t D,
               int64_t inner) {
  if (inner == 1) {
    for (int64_t j = 0; j < D; ++j) out[j] = t[j] * p[j];
    return;
  }
  for (int64_t j = 0; j < D; ++j) {
    const T pj = p[j];
    for (int64_t i = j * inner; i < (j + 1) * inner; ++i) out[i] = t[i] * pj;
  }
}

// One row of the backward: grad_t = g p, and acc_j += sum over the row's elements of unit j of g t
// (acc in T: the caller flushes it into float64 every kFlushRows rows).
template <typename T>
void backward_row(const T* __restrict__ g, const T* __restrict__ t, const T* __restrict__ p,
                  T* __restrict__ grad_t, T* __restrict__ acc, int64_t D, int64_t inner, bool want_t,
                  bool want_p) {
  if (want_t) scale_row(g, p, grad_t, D, inner);
  if (!want_p) return;
  if (inner == 1) {
    for (int64_t j = 0; j < D; ++j) acc[j] += g[j] * t[j];
    return;
  }
  for (int64_t j = 0; j < D; ++j) {
    T s = 0;
    for (int64_t i = j * inner; i < (j + 1) * inner; ++i) s += g[i] * t[i];
    acc[j] += s;
  }
}

template <typename T>
void scale_forward(const T* t, const T* p, T* out, const Blocks& b) {
  const int64_t row = b.D * b.inner;
  at::parallel_for(0, b.outer, grain_rows(b), [&](int64_t lo, int64_t hi) {
    for (int64_t o = lo; o < hi; ++o) scale_row(t + o * row, p, out + o * row, b.D, b.inner);
  });
}

// grad_t = g p (along the unit axis) and acc_j = sum over the other axes of g t, the gradient to p_j.
// Sums run in T over at most kFlushRows rows (for Linear layers an elementwise update along the units,
// which the compiler vectorises; the per-unit sums of conv channels stay scalar) and are then added in
// float64. Each thread sums into its own row of acc, so the result does not depend on how the
// rows of t are scheduled; the rows of acc are added in thread order.
template <typename T>
std::vector<double> scale_backward(const T* g, const T* t, const T* p, T* grad_t, const Blocks& b,
                                   bool want_t, bool want_p) {
  const int threads = at::get_num_threads();
  std::vector<double> acc(static_cast<size_t>(threads) * b.D, 0.0);
  const int64_t row = b.D * b.inner;
  at::parallel_for(0, b.outer, grain_rows(b), [&](int64_t lo, int64_t hi) {
    // (nested in another parallel region the chunk runs inline: clamp the index to our rows)
    const int id = std::min(std::max(at::get_thread_num(), 0), threads - 1);
    double* mine = acc.data() + static_cast<size_t>(id) * b.D;
    std::vector<T> part(want_p ? b.D : 0, T(0));
    for (int64_t o = lo; o < hi; ++o) {
      backward_row(g + o * row, t + o * row, p, want_t ? grad_t + o * row : nullptr, part.data(), b.D,
                   b.inner, want_t, want_p);
      if (want_p && ((o - lo + 1) % kFlushRows == 0 || o + 1 == hi))
        for (int64_t j = 0; j < b.D; ++j) {
          mine[j] += part[j];
          part[j] = T(0);
        }
    }
  });
  for (int k = 1; k < threads; ++k)
    for (int64_t j = 0; j < b.D; ++j) acc[j] += acc[static_cast<size_t>(k) * b.D + j];
  acc.resize(b.D);
  return acc;
}

// The backward in ATen operations, for double backward (gradient penalties): grad_t = g p and
// dL/dr = sum_j dp_j/dr sum g t keep their graphs to g and t. As on the PyTorch path, which linearises p
// around r's value, p and dp/dr are constants of that graph (no second derivative in r).
torch::autograd::variable_list differentiable_backward(const torch::Tensor& g, const torch::Tensor& t,
                                                       const torch::Tensor& p, const torch::Tensor& dp_dr,
                                                       int64_t dim, bool want_t, bool want_r,
                                                       const std::vector<int64_t>& r_sizes,
                                                       const torch::TensorOptions& r_options) {
  std::vector<int64_t> shape(t.dim() - dim, 1), others;
  shape[0] = p.size(0);
  for (int64_t k = 0; k < t.dim(); ++k)
    if (k != dim) others.push_back(k);
  torch::Tensor grad_t, grad_r;
  if (want_t) grad_t = g * p.view(shape);
  if (want_r) {
    auto grad_p = others.empty() ? g * t : (g * t).sum(others);
    grad_r = (grad_p.to(torch::kFloat64) * dp_dr).sum().to(r_options.dtype()).reshape(r_sizes);
  }
  return {grad_t, grad_r, torch::Tensor(), torch::Tensor()};
}

class ExponentialScale : public torch::autograd::Function<ExponentialScale> {
 public:
  // t ⊙ p(r) along axis `dim` (normalised) of t, p normalised over n >= t.size(dim) units (n > D:
  // truncation without renormalisation, §5). Few ATen calls: each costs microseconds, as much as the
  // arithmetic on these small tensors.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& t,
                               const torch::Tensor& r, int64_t n, int64_t dim) {
    // t is contiguous: exponential_scale declines other layouts.
    const Blocks b = blocks_of(t, dim);
    auto p = torch::empty({b.D}, t.options());
    auto dp_dr = torch::empty({b.D}, t.options().dtype(torch::kFloat64));
    auto out = torch::empty(t.sizes(), t.options());
    const double r_value = r.item<double>();
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "exponential_scale_forward", [&] {
      exponential_importance<scalar_t>(r_value, b.D, std::max(n, b.D), p.data_ptr<scalar_t>(),
                                       dp_dr.data_ptr<double>());
      scale_forward<scalar_t>(t.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), b);
    });
    ctx->save_for_backward({t, p, dp_dr});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["r_sizes"] = r.sizes().vec();  // r itself is not saved: an in-place update of r
    ctx->saved_data["r_dtype"] = r.scalar_type();  // before backward must not invalidate the graph
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const bool want_t = ctx->needs_input_grad(0), want_r = ctx->needs_input_grad(1);
    const auto &t = saved[0], &p = saved[1], &dp_dr = saved[2];  // t saved contiguous
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const auto r_options = torch::TensorOptions().dtype(ctx->saved_data["r_dtype"].toScalarType());
    if (at::GradMode::is_enabled())  // create_graph=True: the gradients must carry their own graph
      return differentiable_backward(grads[0], t, p, dp_dr, dim, want_t, want_r,
                                     ctx->saved_data["r_sizes"].toIntVector(), r_options);
    auto g = grads[0].contiguous();
    const Blocks b = blocks_of(t, dim);
    torch::Tensor grad_t = want_t ? torch::empty_like(t) : torch::Tensor();
    std::vector<double> grad_p;
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "exponential_scale_backward", [&] {
      grad_p = scale_backward<scalar_t>(g.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                                        want_t ? grad_t.data_ptr<scalar_t>() : nullptr, b, want_t, want_r);
    });
    torch::Tensor grad_r;
    if (want_r) {  // dL/dr = sum_j dL/dp_j dp_j/dr
      const double* d = dp_dr.data_ptr<double>();
      double s = 0.0;
      for (int64_t j = 0; j < b.D; ++j) s += grad_p[j] * d[j];
      grad_r = torch::full(ctx->saved_data["r_sizes"].toIntVector(), s, r_options);
    }
    return {grad_t, grad_r, torch::Tensor(), torch::Tensor()};
  }
};

// The layer rescaling through the kernel, or None where the kernel does not apply: the caller then
// takes the PyTorch path. n <= D means "normalise over the live width".
std::optional<torch::Tensor> exponential_scale(const torch::Tensor& t, const torch::Tensor& r, int64_t n,
                                               int64_t dim) {
  // Declined (the PyTorch path keeps its own conventions there): another device or dtype, a rate of
  // another dtype (type promotion), a non-contiguous layout (e.g. channels_last, which t * p keeps).
  if (!t.device().is_cpu() || !r.device().is_cpu() || t.scalar_type() != r.scalar_type() ||
      (t.scalar_type() != torch::kFloat32 && t.scalar_type() != torch::kFloat64) || !t.is_contiguous())
    return std::nullopt;
  TORCH_CHECK(r.numel() == 1, "exponential_scale: r must hold one value, got ", r.numel());
  const int64_t axis = dim < 0 ? dim + t.dim() : dim;
  TORCH_CHECK(axis >= 0 && axis < t.dim(), "exponential_scale: no axis ", dim, " in a ", t.dim(),
              "-d tensor");
  return ExponentialScale::apply(t, r, n, axis);
}

torch::Tensor exponential_importance_table(double r, int64_t D, int64_t n) {
  auto out = torch::empty({2, D}, torch::kFloat64);
  exponential_importance<double>(r, D, std::max(n, D), out.data_ptr<double>(), out.data_ptr<double>() + D);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("exponential_scale", &exponential_scale,
        "t * p(r) along axis dim, p of the discretised exponential over max(n, D) units, as one autograd "
        "node; None for tensors the kernel does not handle (not CPU, not float32/float64)");
  m.def("exponential_importance", &exponential_importance_table,
        "(2, D) float64: p and dp/dr of the discretised exponential at raw rate r over n units");
}
