// Fused elementwise ops of the Llama decoder for CPU: residual add + RMSNorm, SiLU(gate) * up, and rotary
// embeddings. Each replaces three to five torch ops (and their temporaries) with one pass over the rows, threads
// across tokens. Rounding follows the unfused torch code step by step (a bf16 add rounds, the normalized row rounds
// before the weight multiplies, silu(gate) rounds before the product, each rotary product rounds before the sum),
// so outputs equal the torch ops' up to the last bits of the fp32 sum of squares and of exp; rotary is bit-exact.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec_math.h"

namespace {

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) {
  uint32_t u = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float widen(at::Half x) { return static_cast<float>(x); }

// Rounds to T as torch does (nearest, ties to even).
template <typename T> inline T narrow(float x) { return static_cast<T>(x); }
template <> inline float narrow<float>(float x) { return x; }
template <> inline at::BFloat16 narrow<at::BFloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return at::BFloat16(static_cast<uint16_t>(u >> 16), at::BFloat16::from_bits());
}

// R: the residual stream's dtype, T: the model's (of x, weight and out). A float32 residual (R = float with
// T = bf16) keeps the sum of all layers' outputs unrounded, as llama.cpp does; R = T rounds it as torch does.
template <typename T, typename R>
void add_rms_norm_rows(const T* x, R* residual, const T* weight, T* out, int64_t rows, int64_t h, double eps,
                       bool add) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / h), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      R* res = residual + r * h;
      const T* xr = x + r * h;
      float ss = 0.f;
      for (int64_t i = 0; i < h; ++i) {
        float v = add ? widen(narrow<R>(widen(res[i]) + widen(xr[i]))) : widen(res[i]);
        if (add) res[i] = narrow<R>(v);
        ss += v * v;
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
      T* o = out + r * h;
      for (int64_t i = 0; i < h; ++i) o[i] = narrow<T>(widen(weight[i]) * widen(narrow<T>(widen(res[i]) * inv)));
    }
  });
}

template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* g = gate_up + r * 2 * n;
      const T* u = g + n;
      T* o = out + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float gv = widen(g[i]);
        const float silu = widen(narrow<T>(gv / (1.0f + conveyor::exp_approx(-gv))));
        o[i] = narrow<T>(silu * widen(u[i]));
      }
    }
  });
}

// out[t, h, i] = x[t, h, i] * cos[t, i] + x[t, h, (i + d/2) mod d] * signed_sin[t, i], each product rounded to T
// before the sum, as torch computes x * cos + x.roll(d/2) * signed_sin. x's rows (tokens) may be strided.
template <typename T>
void rope_rows(const T* x, int64_t x_stride, const T* cos, const T* sin, T* out, int64_t tokens, int64_t heads,
               int64_t d) {
  const int64_t half = d / 2;
  at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / (heads * d)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const T* c = cos + t * d;
      const T* s = sin + t * d;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xr = x + t * x_stride + h * d;
        T* o = out + (t * heads + h) * d;
        for (int64_t lo = 0; lo < d; lo += half) {  // the first half pairs with the second, and back
          const T* partner = xr + (lo ? -half : half);
#pragma omp simd
          for (int64_t i = lo; i < lo + half; ++i) {
            const float a = widen(narrow<T>(widen(xr[i]) * widen(c[i])));
            o[i] = narrow<T>(a + widen(narrow<T>(widen(partner[i]) * widen(s[i]))));
          }
        }
      }
    }
  });
}

template <typename F>
void dispatch(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case torch::kFloat: f(static_cast<float*>(nullptr)); break;
    case torch::kBFloat16: f(static_cast<at::BFloat16*>(nullptr)); break;
    case torch::kHalf: f(static_cast<at::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, op, ": dtype ", t, " is not supported (float32, bfloat16, float16 are)");
  }
}

}  // namespace

// out = RMSNorm(residual + x) * weight in weight's dtype, with residual updated in place to residual + x (x
// undefined: no add). residual is float32 or weight's dtype; x (if given) has weight's dtype.
torch::Tensor add_rms_norm(const c10::optional<torch::Tensor>& x, torch::Tensor residual, torch::Tensor weight,
                           double eps) {
  TORCH_CHECK(residual.device().is_cpu() && residual.is_contiguous() && residual.dim() >= 1,
              "add_rms_norm: a contiguous CPU residual expected");
  const int64_t h = residual.size(-1), rows = h ? residual.numel() / h : 0;
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == h && weight.is_contiguous(),
              "add_rms_norm: weight [hidden] expected");
  TORCH_CHECK(residual.scalar_type() == dtype || residual.scalar_type() == torch::kFloat,
              "add_rms_norm: residual must be float32 or weight's dtype");
  const bool add = x.has_value();
  torch::Tensor xc = add ? x->contiguous() : torch::empty({0}, weight.options());
  TORCH_CHECK(!add || (xc.sizes() == residual.sizes() && xc.scalar_type() == dtype),
              "add_rms_norm: x must have residual's shape and weight's dtype");
  auto out = torch::empty(residual.sizes(), weight.options());
  dispatch(dtype, "add_rms_norm", [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    if (residual.scalar_type() == torch::kFloat)
      add_rms_norm_rows(xc.data_ptr<T>(), residual.data_ptr<float>(), weight.data_ptr<T>(), out.data_ptr<T>(),
                        rows, h, eps, add);
    else
      add_rms_norm_rows(xc.data_ptr<T>(), residual.data_ptr<T>(), weight.data_ptr<T>(), out.data_ptr<T>(), rows,
                        h, eps, add);
  });
  return out;
}

// [..., 2n] -> [..., n]: silu(first half) * second half.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "silu_mul: a CPU tensor with an even last dimension expected");
  auto gu = gate_up.contiguous();
  const int64_t n = gu.size(-1) / 2, rows = n ? gu.numel() / (2 * n) : 0;
  auto sizes = gu.sizes().vec();
  sizes.back() = n;
  auto out = torch::empty(sizes, gu.options());
  dispatch(gu.scalar_type(), "silu_mul", [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    silu_mul_rows(gu.data_ptr<T>(), out.data_ptr<T>(), rows, n);
  });
  return out;
}

// x [tokens, heads, d] (heads and d contiguous; tokens any stride), cos and signed_sin [tokens, 1, d] contiguous,
// all one dtype -> contiguous [tokens, heads, d]: the rotary embedding of every head (rotate-half layout).
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor signed_sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(2) % 2 == 0,
              "rope: a CPU x [tokens, heads, d] with even d expected");
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2);
  TORCH_CHECK(x.stride(2) == 1 && (heads <= 1 || x.stride(1) == d),
              "rope: x's heads and head dim must be contiguous");
  for (const auto* tab : {&cos, &signed_sin})
    TORCH_CHECK(tab->is_contiguous() && tab->scalar_type() == x.scalar_type() && tab->numel() == tokens * d,
                "rope: cos and signed_sin [tokens, 1, d] contiguous, in x's dtype, expected");
  auto out = torch::empty({tokens, heads, d}, x.options());
  if (out.numel() == 0) return out;
  dispatch(x.scalar_type(), "rope", [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    rope_rows(x.data_ptr<T>(), x.stride(0), cos.data_ptr<T>(), signed_sin.data_ptr<T>(), out.data_ptr<T>(), tokens,
              heads, d);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(conveyor, m) {
  m.def("add_rms_norm(Tensor? x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(conveyor, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope", &rope);
}
