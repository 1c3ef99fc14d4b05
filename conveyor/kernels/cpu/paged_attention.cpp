// Paged attention for CPU: one call per layer writes the step's new K/V into the paged cache, then attends every
// query row of every sequence through its block table (decode, speculative verification, prefill with or without
// a cached prefix). The contract is conveyor/model/attention.py's reference_paged_attention.
//
// Work is split into items of (sequence, KV head, tile of up to kTileTokens query tokens); the Hq / Hk query heads
// that share a KV head are rows of one item, so each key block is converted to fp32 once for all of them. Items
// are assigned to threads longest-first (LPT) because one long context must not sit behind many short ones on the
// same thread. Each row keeps an online softmax (running max, running sum, unnormalized accumulator) in fp32, as in
// FlashAttention (Dao et al. 2022) and vLLM's paged attention; the code here is ours.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "vec_math.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int kTileTokens = 16;      // query tokens per work item
constexpr int kTransposedRows = 8;   // from this many rows per item, scores are computed against K transposed
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// fp32 view of n elements: the source itself for fp32, else converted into buf.
inline const float* as_float(const float* src, float*, int64_t) { return src; }

inline const float* as_float(const at::BFloat16* src, float* buf, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(buf);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = uint32_t(s[i]) << 16;  // bf16 is the high half of an fp32
  return buf;
}

inline const float* as_float(const at::Half* src, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

struct Geometry {
  int64_t hq, hk, group, d, bs, head_stride;  // head_stride: elements of one KV head of the cache (N * bs * d)
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head, out_tok;  // strides of q, k, v (elements) and of out
  int window;
  float scale;
};

struct WorkItem {
  int seq, kv_head, row0, ntok, pos0;  // query rows row0 .. row0 + ntok - 1 at positions pos0 .. pos0 + ntok - 1
  int64_t cost;
};

struct Scratch {
  std::vector<float> q, acc, m, l, s, kbuf, vbuf, kt;
  void reserve(int rows, int64_t d, int64_t bs) {
    q.resize(rows * d); acc.resize(rows * d); m.resize(rows); l.resize(rows); s.resize(bs);
    kbuf.resize(bs * d); vbuf.resize(bs * d); kt.resize(bs * d);
  }
};

inline int first_key(int pos, int window) { return window > 0 ? std::max(0, pos - window + 1) : 0; }

// Scores of one row against keys a..b of a block: s[j] = q . k_j (q already scaled).
inline void scores_dot(const float* q, const float* kf, int64_t d, int a, int b, float* s) {
  for (int j = a; j <= b; ++j) {
    const float* k = kf + j * d;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t e = 0; e < d; ++e) acc += q[e] * k[e];
    s[j] = acc;
  }
}

// The same against K transposed [d, bs]: all bs keys at once, vectorized across keys (no horizontal sums).
inline void scores_transposed(const float* q, const float* kt, int64_t d, int64_t bs, float* s) {
  for (int64_t j = 0; j < bs; ++j) s[j] = 0.f;
  for (int64_t e = 0; e < d; ++e) {
    const float qe = q[e];
    const float* row = kt + e * bs;
#pragma omp simd
    for (int64_t j = 0; j < bs; ++j) s[j] += qe * row[j];
  }
}

// Online-softmax update of one row with keys a..b of a block whose scores are in s.
inline void accumulate(float* s, const float* vf, int64_t d, int a, int b, float& m, float& l, float* acc) {
  float mx = kNegInf;
  for (int j = a; j <= b; ++j) mx = std::max(mx, s[j]);
  if (mx > m) {
    const float alpha = m == kNegInf ? 0.f : conveyor::exp_approx(m - mx);
    l *= alpha;
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) acc[e] *= alpha;
    m = mx;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = a; j <= b; ++j) {
    s[j] = conveyor::exp_approx(s[j] - m);
    sum += s[j];
  }
  l += sum;
  for (int j = a; j <= b; ++j) {
    const float p = s[j];
    const float* v = vf + j * d;
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) acc[e] += p * v[e];
  }
}

template <typename T>
void attend_generic(const WorkItem& w, const T* q, T* out, const T* kc, const T* vc, const int32_t* table,
            const Geometry& g, Scratch& sc) {
  const int rows = w.ntok * g.group;
  const int64_t d = g.d, bs = g.bs;
  sc.reserve(rows, d, bs);
  for (int i = 0; i < w.ntok; ++i) {
    for (int j = 0; j < g.group; ++j) {
      const T* src = q + (w.row0 + i) * g.q_tok + (w.kv_head * g.group + j) * g.q_head;
      float* dst = sc.q.data() + (i * g.group + j) * d;
      for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<float>(src[e]) * g.scale;
    }
  }
  std::fill(sc.acc.begin(), sc.acc.begin() + rows * d, 0.f);
  std::fill(sc.m.begin(), sc.m.begin() + rows, kNegInf);
  std::fill(sc.l.begin(), sc.l.begin() + rows, 0.f);
  const bool transposed = rows >= kTransposedRows && bs >= 8;
  const int lo = first_key(w.pos0, g.window), hi = w.pos0 + w.ntok - 1;
  const T* kh = kc + w.kv_head * g.head_stride;
  const T* vh = vc + w.kv_head * g.head_stride;
  for (int64_t blk = lo / bs; blk <= hi / bs; ++blk) {
    const int64_t start = blk * bs;
    const int n = static_cast<int>(std::min<int64_t>(bs, hi + 1 - start));
    const int64_t off = static_cast<int64_t>(table[blk]) * bs * d;
    const float* kf = as_float(kh + off, sc.kbuf.data(), n * d);
    const float* vf = as_float(vh + off, sc.vbuf.data(), n * d);
    if (transposed) {
      std::fill(sc.kt.begin(), sc.kt.end(), 0.f);
      for (int j = 0; j < n; ++j)
        for (int64_t e = 0; e < d; ++e) sc.kt[e * bs + j] = kf[j * d + e];
    }
    for (int r = 0; r < rows; ++r) {
      const int pos = w.pos0 + r / g.group;
      const int a = static_cast<int>(std::max<int64_t>(first_key(pos, g.window), start) - start);
      const int b = static_cast<int>(std::min<int64_t>(pos, start + n - 1) - start);
      if (a > b) continue;
      const float* qr = sc.q.data() + r * d;
      if (transposed) scores_transposed(qr, sc.kt.data(), d, bs, sc.s.data());
      else scores_dot(qr, kf, d, a, b, sc.s.data());
      accumulate(sc.s.data(), vf, d, a, b, sc.m[r], sc.l[r], sc.acc.data() + r * d);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const int i = r / g.group, j = r % g.group;
    T* dst = out + (w.row0 + i) * g.out_tok + (w.kv_head * g.group + j) * d;
    const float inv = 1.f / sc.l[r];  // every row sees at least its own key, so l > 0
    const float* acc = sc.acc.data() + r * d;
    for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(acc[e] * inv);
  }
}

#ifdef __AVX512F__
// The same algorithm with AVX-512 for head_dim = 16 * NC: K/V read straight from the cache (bf16 widened in
// registers), rows of few queries (decode) score key by key, tiles of many rows (prefill) score 16 keys at a time
// against K transposed, so no horizontal sum is needed per score.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// conveyor::exp_approx on 16 lanes (x <= 0 here); 2^k applied with scalef, which is exact.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(-0.693145751953125f), x);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(-1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

// Rescales a row's accumulator for a new running max mx (if larger) and turns the scores s[a..b] into
// probabilities under it, returning their sum.
template <int NC>
inline float softmax_step(float* s, int a, int b, float& m, float& l, float* acc) {
  float mx = kNegInf;
  for (int j = a; j <= b; ++j) mx = std::max(mx, s[j]);
  if (mx > m) {
    const float alpha = m == kNegInf ? 0.f : conveyor::exp_approx(m - mx);
    l *= alpha;
    const __m512 av = _mm512_set1_ps(alpha);
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + 16 * c, _mm512_mul_ps(av, _mm512_loadu_ps(acc + 16 * c)));
    m = mx;
  }
  const __m512 mv = _mm512_set1_ps(m);
  float sum = 0.f;
  for (int j = a; j <= b; j += 16) {
    const __mmask16 live = static_cast<__mmask16>(b - j >= 15 ? 0xFFFF : (1u << (b - j + 1)) - 1);
    __m512 p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), mv)));
    _mm512_mask_storeu_ps(s + j, live, p);
    sum += _mm512_reduce_add_ps(p);
  }
  l += sum;
  return sum;
}

// acc += sum_j p[j] * v_j for keys a..b, v_j = vb + j * 16 * NC.
template <int NC, typename V>
inline void add_values(const float* p, const V* vb, int a, int b, float* acc) {
  __m512 av[NC];
  for (int c = 0; c < NC; ++c) av[c] = _mm512_loadu_ps(acc + 16 * c);
  for (int j = a; j <= b; ++j) {
    const __m512 pj = _mm512_set1_ps(p[j]);
    for (int c = 0; c < NC; ++c) av[c] = _mm512_fmadd_ps(pj, load16(vb + j * 16 * NC + 16 * c), av[c]);
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + 16 * c, av[c]);
}

template <int NC, typename T>
inline void scores_keywise(const float* q, const T* kb, int a, int b, float* s) {
  __m512 qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  for (int j = a; j <= b; ++j) {
    __m512 t0 = _mm512_mul_ps(qv[0], load16(kb + j * 16 * NC));
    __m512 t1 = _mm512_setzero_ps();
    for (int c = 1; c < NC; c += 2) {
      t1 = _mm512_fmadd_ps(qv[c], load16(kb + j * 16 * NC + 16 * c), t1);
      if (c + 1 < NC) t0 = _mm512_fmadd_ps(qv[c + 1], load16(kb + j * 16 * NC + 16 * (c + 1)), t0);
    }
    s[j] = _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
  }
}

// Scores of one row against 16 keys held transposed: kt[e * 16 + j] is element e of key j.
template <int NC>
inline __m512 scores_16(const float* q, const float* kt) {
  __m512 t[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int e = 0; e < 16 * NC; e += 4)
    for (int u = 0; u < 4; ++u) t[u] = _mm512_fmadd_ps(_mm512_set1_ps(q[e + u]), _mm512_loadu_ps(kt + (e + u) * 16), t[u]);
  return _mm512_add_ps(_mm512_add_ps(t[0], t[1]), _mm512_add_ps(t[2], t[3]));
}

template <int NC, typename T>
void attend_avx512(const WorkItem& w, const T* q, T* out, const T* kc, const T* vc, const int32_t* table,
                   const Geometry& g, Scratch& sc) {
  constexpr int D = 16 * NC;
  const int rows = w.ntok * g.group;
  const int64_t bs = g.bs;
  sc.reserve(rows, D, std::max<int64_t>(bs, 16));
  for (int r = 0; r < rows; ++r) {
    const T* src = q + (w.row0 + r / g.group) * g.q_tok + (w.kv_head * g.group + r % g.group) * g.q_head;
    for (int c = 0; c < NC; ++c)
      _mm512_storeu_ps(sc.q.data() + r * D + 16 * c, _mm512_mul_ps(load16(src + 16 * c), _mm512_set1_ps(g.scale)));
  }
  std::fill(sc.acc.begin(), sc.acc.begin() + rows * D, 0.f);
  std::fill(sc.m.begin(), sc.m.begin() + rows, kNegInf);
  std::fill(sc.l.begin(), sc.l.begin() + rows, 0.f);
  const bool transposed = rows >= kTransposedRows && bs % 16 == 0;
  const int lo = first_key(w.pos0, g.window), hi = w.pos0 + w.ntok - 1;
  const T* kh = kc + w.kv_head * g.head_stride;
  const T* vh = vc + w.kv_head * g.head_stride;
  float* s = sc.s.data();
  for (int64_t blk = lo / bs; blk <= hi / bs; ++blk) {
    const int64_t start = blk * bs;
    const T* kb = kh + static_cast<int64_t>(table[blk]) * bs * D;
    const T* vb = vh + static_cast<int64_t>(table[blk]) * bs * D;
    if (blk < hi / bs) {  // blocks are scattered in memory: fetch the next one while this one is computed
      const char* nk = reinterpret_cast<const char*>(kh + static_cast<int64_t>(table[blk + 1]) * bs * D);
      const char* nv = reinterpret_cast<const char*>(vh + static_cast<int64_t>(table[blk + 1]) * bs * D);
      for (int64_t byte = 0; byte < bs * D * static_cast<int64_t>(sizeof(T)); byte += 64) {
        _mm_prefetch(nk + byte, _MM_HINT_T0);
        _mm_prefetch(nv + byte, _MM_HINT_T0);
      }
    }
    for (int64_t g0 = transposed ? std::max<int64_t>(0, (lo - start) / 16 * 16) : 0;
         g0 < bs && start + g0 <= hi; g0 += transposed ? 16 : bs) {
      const int64_t gstart = start + g0;
      const int n = static_cast<int>(std::min<int64_t>(transposed ? 16 : bs, hi + 1 - gstart));
      const T* kg = kb + g0 * D;
      const T* vg = vb + g0 * D;
      float* vf = sc.vbuf.data();
      if (transposed) {  // K transposed and V widened once for all rows of the tile
        float* kt = sc.kt.data();
        for (int j = 0; j < 16; ++j)
          for (int c = 0; c < NC; ++c) {
            alignas(64) float tmp[16];
            _mm512_store_ps(tmp, j < n ? load16(kg + j * D + 16 * c) : _mm512_setzero_ps());
            for (int u = 0; u < 16; ++u) kt[(16 * c + u) * 16 + j] = tmp[u];
          }
        for (int j = 0; j < n; ++j)
          for (int c = 0; c < NC; ++c) _mm512_storeu_ps(vf + j * D + 16 * c, load16(vg + j * D + 16 * c));
      }
      for (int r = 0; r < rows; ++r) {
        const int pos = w.pos0 + r / g.group;
        const int a = static_cast<int>(std::max<int64_t>(first_key(pos, g.window), gstart) - gstart);
        const int b = static_cast<int>(std::min<int64_t>(pos, gstart + n - 1) - gstart);
        if (a > b) continue;
        const float* qr = sc.q.data() + r * D;
        float* acc = sc.acc.data() + r * D;
        if (transposed) {
          _mm512_storeu_ps(s, scores_16<NC>(qr, sc.kt.data()));
          softmax_step<NC>(s, a, b, sc.m[r], sc.l[r], acc);
          add_values<NC>(s, vf, a, b, acc);
        } else {
          scores_keywise<NC>(qr, kg, a, b, s);
          softmax_step<NC>(s, a, b, sc.m[r], sc.l[r], acc);
          add_values<NC>(s, vg, a, b, acc);
        }
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    T* dst = out + (w.row0 + r / g.group) * g.out_tok + (w.kv_head * g.group + r % g.group) * D;
    const float inv = 1.f / sc.l[r];
    const float* acc = sc.acc.data() + r * D;
    for (int e = 0; e < D; ++e) dst[e] = static_cast<T>(acc[e] * inv);
  }
}
#endif

template <typename T>
void attend(const WorkItem& w, const T* q, T* out, const T* kc, const T* vc, const int32_t* table,
            const Geometry& g, Scratch& sc) {
#ifdef __AVX512F__
  if (g.d == 64) return attend_avx512<4>(w, q, out, kc, vc, table, g, sc);
  if (g.d == 128) return attend_avx512<8>(w, q, out, kc, vc, table, g, sc);
#endif
  attend_generic(w, q, out, kc, vc, table, g, sc);
}

// Items of every sequence, then a longest-first assignment to threads.
std::vector<std::vector<WorkItem>> plan(const int32_t* qstart, const int32_t* lens, int64_t nseq, int64_t hk,
                                        int64_t group, int window, int threads) {
  std::vector<WorkItem> items;
  for (int s = 0; s < nseq; ++s) {
    const int qlen = qstart[s + 1] - qstart[s];
    for (int t = 0; t < qlen; t += kTileTokens) {
      const int ntok = std::min(kTileTokens, qlen - t), pos0 = lens[s] - qlen + t;
      const int64_t keys = pos0 + ntok - first_key(pos0, window);
      for (int h = 0; h < hk; ++h) items.push_back({s, h, qstart[s] + t, ntok, pos0, keys * ntok * group + 64});
    }
  }
  std::sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  std::vector<std::vector<WorkItem>> per_thread(threads);
  std::vector<int64_t> load(threads, 0);
  for (const WorkItem& w : items) {
    const int t = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    per_thread[t].push_back(w);
    load[t] += w.cost;
  }
  return per_thread;
}

template <typename T>
void write_kv(const T* k, const T* v, T* kc, T* vc, const int64_t* slots, int64_t ntok, const Geometry& g) {
  at::parallel_for(0, ntok, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      for (int64_t h = 0; h < g.hk; ++h) {
        const int64_t dst = h * g.head_stride + slots[t] * g.d;
        std::memcpy(kc + dst, k + t * g.k_tok + h * g.k_head, g.d * sizeof(T));
        std::memcpy(vc + dst, v + t * g.v_tok + h * g.v_head, g.d * sizeof(T));
      }
    }
  });
}

void check(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cache,
           const torch::Tensor& slots, const torch::Tensor& tables, const torch::Tensor& qstart,
           const torch::Tensor& lens) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "paged_attention: CPU tensors expected");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && cache.dim() == 5 && cache.size(0) == 2,
              "paged_attention: q, k, v [T, H, D] and kv_cache [2, Hk, N, bs, D] expected");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && cache.is_contiguous(),
              "paged_attention: q, k, v with contiguous rows and a contiguous kv_cache expected");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
              cache.scalar_type() == q.scalar_type(), "paged_attention: q, k, v and kv_cache must share a dtype");
  TORCH_CHECK(q.size(1) > 0 && k.size(1) > 0 && q.size(2) > 0 && cache.size(3) > 0,
              "paged_attention: heads, head_dim and block size must be positive");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == cache.size(1) &&
              q.size(2) == cache.size(4) && k.size(2) == q.size(2) && q.size(1) % k.size(1) == 0,
              "paged_attention: shapes of q, k, v and kv_cache disagree");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.numel() == q.size(0) && slots.is_contiguous(),
              "paged_attention: slot_mapping must be int64 [T]");
  TORCH_CHECK(tables.scalar_type() == torch::kInt32 && qstart.scalar_type() == torch::kInt32 &&
              lens.scalar_type() == torch::kInt32 && tables.is_contiguous() && qstart.is_contiguous() &&
              lens.is_contiguous(), "paged_attention: block_tables, query_start, seq_lens must be int32");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == lens.numel() && qstart.numel() == lens.numel() + 1,
              "paged_attention: block_tables [S, W], query_start [S + 1], seq_lens [S] expected");
}

}  // namespace

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache,
                              torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor query_start,
                              torch::Tensor seq_lens, double scale, int64_t sliding_window) {
  check(q, k, v, kv_cache, slot_mapping, block_tables, query_start, seq_lens);
  TORCH_CHECK(sliding_window >= 0, "paged_attention: sliding_window must be >= 0 (0: none), got ", sliding_window);
  // a window at least as long as any int32 position is no window
  const int window = sliding_window >= std::numeric_limits<int32_t>::max() ? 0 : static_cast<int>(sliding_window);
  const int64_t nseq = seq_lens.numel(), width = block_tables.size(1);
  const int32_t* qs = query_start.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  TORCH_CHECK(qs[0] == 0 && qs[nseq] == q.size(0), "paged_attention: query_start must run from 0 to T");
  const int64_t bs = kv_cache.size(3), nblocks = kv_cache.size(2);
  for (int64_t s = 0; s < nseq; ++s) {
    const int qlen = qs[s + 1] - qs[s];
    TORCH_CHECK(qlen >= 0 && lens[s] >= qlen && (lens[s] + bs - 1) / bs <= width,
                "paged_attention: sequence ", s, " has ", qlen, " queries, ", lens[s], " keys and ", width,
                " block table entries");
    const int32_t* row = block_tables.data_ptr<int32_t>() + s * width;
    for (int64_t b = 0; b < (lens[s] + bs - 1) / bs; ++b)
      TORCH_CHECK(row[b] >= 0 && row[b] < nblocks, "paged_attention: block id ", row[b], " out of range");
  }
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < q.size(0); ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < nblocks * bs, "paged_attention: slot ", slots[t], " out of range");
  auto out = torch::empty(q.sizes(), q.options());
  Geometry g{q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), bs, nblocks * bs * q.size(2),
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
             window, static_cast<float>(scale)};
  const int threads = std::max(1, at::get_num_threads());
  auto work = plan(qs, lens, nseq, g.hk, g.group, g.window, threads);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  auto run = [&](auto* typed) {
    using scalar_t = std::remove_pointer_t<decltype(typed)>;
    scalar_t* kc = kv_cache.data_ptr<scalar_t>();
    scalar_t* vc = kc + g.hk * g.head_stride;
    write_kv(k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), kc, vc, slots, q.size(0), g);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      Scratch sc;
      for (int64_t t = b; t < e; ++t)
        for (const WorkItem& w : work[t]) attend(w, qp, op, kc, vc, tables + w.seq * width, g, sc);
    });
  };
  switch (q.scalar_type()) {
    case torch::kFloat: run(static_cast<float*>(nullptr)); break;
    case torch::kBFloat16: run(static_cast<at::BFloat16*>(nullptr)); break;
    case torch::kHalf: run(static_cast<at::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "paged_attention: dtype ", q.scalar_type(), " is not supported (float32, bfloat16, float16 are)");
  }
  return out;
}

TORCH_LIBRARY(conveyor, m) {
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor query_start, Tensor seq_lens, float scale, int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(conveyor, CPU, m) { m.impl("paged_attention", &paged_attention); }
