// Block LoRA: out[n] = base[n] + scale * (x[n] @ A[b].T) @ B[b] with b = block_ids[n] per sample.
//
// The add-on is memory bound (k is tiny: a few multiply-adds per element of x and of out), so the
// kernels make one pass over each row: per token h = A_b x (k dot products), then
// out = base + scale * B_b^T h written straight from base, with an fp32 accumulator row in L1.
// 16-bit banks are widened to fp32 once per call for the blocks actually used, 16-bit rows of x /
// base / grad_out on the fly; everything accumulates in fp32 and rounds once on the store.
// Samples with block -1 cost a copy of base (bit for bit) and nothing else. In place (out == base,
// inference only) they cost nothing at all: only the rows of edited samples are visited, each
// element read, updated and written back with the same arithmetic as the out-of-place path (so the
// results are bitwise identical), and no output tensor is allocated (and page-faulted) at all.
//
// Backward, rows pass (parallel over token tiles): gh = scale * B_b grad_out, grad_x = A_b^T gh.
// Columns pass (parallel over (block, column chunk)): grad_A[b] = sum gh x^T, grad_B[b] = scale *
// sum h grad_out^T over the samples of block b. Each output element is summed by a single task in
// sample/token order, so gradients are deterministic for any thread count; no atomics, no
// per-thread partial banks.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "melo_kernels.h"

namespace melo {
namespace {

constexpr int64_t kTokenTile = 16;  // tokens per task of the row passes
constexpr int64_t kColumnChunk = 256;  // columns per task of the gradient-of-bank pass
constexpr int64_t kOutChunk = 512;  // output columns per step of the forward (k x 2 KiB of B_b in L1)

int64_t forward_scratch_floats(const BlockLoraDims& dm) { return kTokenTile * dm.rank + dm.d_in + kOutChunk; }

struct Plan {
  std::vector<const float*> a, b;  // per sample: its fp32 A_b [k, d_in] / B_b [k, d_out], null for -1
  std::vector<int64_t> blocks;  // distinct blocks used, ascending
  std::vector<std::vector<int64_t>> samples;  // per entry of `blocks`: its samples, ascending
  std::vector<float> a_store, b_store;  // fp32 copies of the used blocks of a 16-bit bank
};

template <typename T>
std::string make_plan(const T* A, const T* B, const int64_t* ids, const BlockLoraDims& dm, Plan& plan) {
  const int64_t k = dm.rank;
  std::vector<int64_t> slot(static_cast<size_t>(dm.n_blocks), -1);
  for (int64_t n = 0; n < dm.n_samples; ++n) {
    const int64_t b = ids[n];
    if (b < -1 || b >= dm.n_blocks)
      return "block_lora: block_ids[" + std::to_string(n) + "] = " + std::to_string(b) + " is outside [-1, " +
             std::to_string(dm.n_blocks) + ")";
    if (b >= 0) slot[b] = 0;
  }
  for (int64_t b = 0; b < dm.n_blocks; ++b) {
    if (slot[b] < 0) continue;
    slot[b] = static_cast<int64_t>(plan.blocks.size());
    plan.blocks.push_back(b);
  }
  plan.samples.resize(plan.blocks.size());
  for (int64_t n = 0; n < dm.n_samples; ++n)
    if (ids[n] >= 0) plan.samples[slot[ids[n]]].push_back(n);

  const int64_t a_size = k * dm.d_in, b_size = k * dm.d_out;
  std::vector<const float*> a_of(plan.blocks.size()), b_of(plan.blocks.size());
  if constexpr (std::is_same<T, float>::value) {
    for (size_t s = 0; s < plan.blocks.size(); ++s) {
      a_of[s] = A + plan.blocks[s] * a_size;
      b_of[s] = B + plan.blocks[s] * b_size;
    }
  } else {
    plan.a_store.resize(plan.blocks.size() * a_size);
    plan.b_store.resize(plan.blocks.size() * b_size);
    for (size_t s = 0; s < plan.blocks.size(); ++s) {
      float* ad = plan.a_store.data() + s * a_size;
      float* bd = plan.b_store.data() + s * b_size;
      const T* as = A + plan.blocks[s] * a_size;
      const T* bs = B + plan.blocks[s] * b_size;
      for (int64_t i = 0; i < a_size; ++i) ad[i] = to_f32(as[i]);
      for (int64_t i = 0; i < b_size; ++i) bd[i] = to_f32(bs[i]);
      a_of[s] = ad;
      b_of[s] = bd;
    }
  }
  plan.a.assign(static_cast<size_t>(dm.n_samples), nullptr);
  plan.b.assign(static_cast<size_t>(dm.n_samples), nullptr);
  for (int64_t n = 0; n < dm.n_samples; ++n) {
    if (ids[n] < 0) continue;
    plan.a[n] = a_of[slot[ids[n]]];
    plan.b[n] = b_of[slot[ids[n]]];
  }
  return "";
}

// fp32 view of a row: the row itself for fp32, else converted into buf.
template <typename T>
MELO_INLINE const float* row_f32(const T* row, int64_t n, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    return row;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = to_f32(row[i]);
    return buf;
  }
}

template <int W>
MELO_INLINE float dot(const float* a, const float* b, int64_t n) {
  VecF<W> acc0{}, acc1{};  // two accumulators: hides the FMA latency
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 += load_vec<W>(a + i) * load_vec<W>(b + i);
    acc1 += load_vec<W>(a + i + W) * load_vec<W>(b + i + W);
  }
  float s = reduce_vec<W>(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// acc[0:n] = sum_j coef[j] * rows[j * stride : j * stride + n], one pass over acc.
template <int W>
MELO_INLINE void combine_rows(const float* coef, const float* rows, int64_t stride, int64_t k, int64_t n,
                              float* acc) {
  if (k == 0) {  // rank 0: the product is empty, i.e. zero
    std::fill(acc, acc + n, 0.0f);
    return;
  }
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    VecF<W> v = coef[0] * load_vec<W>(rows + i);
    for (int64_t j = 1; j < k; ++j) v += coef[j] * load_vec<W>(rows + j * stride + i);
    std::memcpy(acc + i, &v, sizeof v);
  }
  for (; i < n; ++i) {
    float v = coef[0] * rows[i];
    for (int64_t j = 1; j < k; ++j) v += coef[j] * rows[j * stride + i];
    acc[i] = v;
  }
}

struct Job {
  const void* x;
  const void* base;
  const void* grad_out;
  void* out;  // forward output, or grad_x
  float* hidden;  // [N*T, k]
  float* grad_hidden;  // [N*T, k] (backward)
  float scale;
  const Plan* plan;
  const BlockLoraDims* dims;
};

// Forward for the tokens [t0, t1) of sample n (t1 - t0 <= kTokenTile). First h = A_b x for the
// whole tile, then the output in column chunks: a chunk of B_b (k x kOutChunk) stays in L1 while
// every token of the tile reads it, and each output element is written once, straight from base.
// scratch: forward_scratch_floats(dims).
template <int W, typename T>
MELO_INLINE void forward_rows(const Job& job, int64_t n, int64_t t0, int64_t t1, float* scratch) {
  const BlockLoraDims& dm = *job.dims;
  const int64_t d_in = dm.d_in, d_out = dm.d_out, k = dm.rank;
  const T* base = static_cast<const T*>(job.base);
  T* out = static_cast<T*>(job.out);
  const int64_t r0 = n * dm.n_tokens + t0, r1 = n * dm.n_tokens + t1;
  const float* A = job.plan->a[n];
  if (A == nullptr) {  // no edit: base bit for bit, or zeros
    if (static_cast<const void*>(out) == static_cast<const void*>(base)) return;  // in place: nothing to do
    if (base != nullptr)
      std::memcpy(out + r0 * d_out, base + r0 * d_out, static_cast<size_t>((r1 - r0) * d_out) * sizeof(T));
    else
      std::memset(static_cast<void*>(out + r0 * d_out), 0, static_cast<size_t>((r1 - r0) * d_out) * sizeof(T));
    return;
  }
  const float* B = job.plan->b[n];
  const T* x = static_cast<const T*>(job.x);
  float* hid = scratch;  // [kTokenTile, k]
  float* xbuf = hid + kTokenTile * k;  // [d_in]
  float* acc = xbuf + d_in;  // [kOutChunk]
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = row_f32(x + r * d_in, d_in, xbuf);
    for (int64_t j = 0; j < k; ++j) hid[(r - r0) * k + j] = dot<W>(xr, A + j * d_in, d_in);
  }
  if (job.hidden != nullptr) std::memcpy(job.hidden + r0 * k, hid, static_cast<size_t>((r1 - r0) * k) * sizeof(float));
  const float scale = job.scale;
  // In place, brow and orow are the same row: each element is read before it is written.
  for (int64_t o0 = 0; o0 < d_out; o0 += kOutChunk) {
    const int64_t nc = std::min(kOutChunk, d_out - o0);
    for (int64_t r = r0; r < r1; ++r) {
      combine_rows<W>(hid + (r - r0) * k, B + o0, d_out, k, nc, acc);
      T* orow = out + r * d_out + o0;
      if (base != nullptr) {
        const T* brow = base + r * d_out + o0;
        for (int64_t o = 0; o < nc; ++o) orow[o] = from_f32<T>(to_f32(brow[o]) + scale * acc[o]);
      } else {
        for (int64_t o = 0; o < nc; ++o) orow[o] = from_f32<T>(scale * acc[o]);
      }
    }
  }
}

// Backward rows pass for tokens [t0, t1) of sample n: grad_hidden = scale * B_b grad_out, and grad_x
// = A_b^T grad_hidden when job.out (grad_x) is set. scratch: d_in + d_out floats.
template <int W, typename T>
MELO_INLINE void backward_rows(const Job& job, int64_t n, int64_t t0, int64_t t1, float* scratch) {
  const BlockLoraDims& dm = *job.dims;
  const int64_t d_in = dm.d_in, d_out = dm.d_out, k = dm.rank;
  const int64_t r0 = n * dm.n_tokens + t0, r1 = n * dm.n_tokens + t1;
  T* grad_x = static_cast<T*>(job.out);
  const float* A = job.plan->a[n];
  if (A == nullptr) {
    if (grad_x != nullptr)
      std::memset(static_cast<void*>(grad_x + r0 * d_in), 0, static_cast<size_t>((r1 - r0) * d_in) * sizeof(T));
    return;
  }
  const float* B = job.plan->b[n];
  const T* grad_out = static_cast<const T*>(job.grad_out);
  float* gbuf = scratch;
  float* acc = scratch + d_out;
  for (int64_t r = r0; r < r1; ++r) {
    const float* g = row_f32(grad_out + r * d_out, d_out, gbuf);
    float* gh = job.grad_hidden + r * k;
    for (int64_t j = 0; j < k; ++j) gh[j] = job.scale * dot<W>(g, B + j * d_out, d_out);
    if (grad_x == nullptr) continue;
    combine_rows<W>(gh, A, d_in, k, d_in, acc);
    T* gx = grad_x + r * d_in;
    for (int64_t i = 0; i < d_in; ++i) gx[i] = from_f32<T>(acc[i]);
  }
}

// One column chunk of one block's gradient: grad[b][:, c0:c1] = factor * sum over the block's
// samples and tokens of coef[r, :]^T src[r, c0:c1]. scratch: (k + 1) * kColumnChunk floats.
template <int W, typename T>
MELO_INLINE void bank_grad_chunk(const Job& job, size_t slot, const T* src, int64_t width, const float* coef,
                                 float factor, T* grad, int64_t c0, float* scratch) {
  const BlockLoraDims& dm = *job.dims;
  const int64_t k = dm.rank;
  const int64_t c1 = std::min(width, c0 + kColumnChunk), nc = c1 - c0;
  float* acc = scratch;
  float* buf = scratch + k * kColumnChunk;
  std::fill(acc, acc + k * kColumnChunk, 0.0f);
  for (const int64_t n : job.plan->samples[slot]) {
    for (int64_t r = n * dm.n_tokens; r < (n + 1) * dm.n_tokens; ++r) {
      const float* s = row_f32(src + r * width + c0, nc, buf);
      for (int64_t j = 0; j < k; ++j) {
        const float c = coef[r * k + j];
        float* a = acc + j * kColumnChunk;
        for (int64_t i = 0; i < nc; ++i) a[i] += c * s[i];
      }
    }
  }
  T* g = grad + job.plan->blocks[slot] * k * width;
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < nc; ++i) g[j * width + c0 + i] = from_f32<T>(factor * acc[j * kColumnChunk + i]);
}

// Per instruction set and dtype: one entry point per pass, each handling one task.
#define MELO_LORA_ISA(SUFFIX, ATTR, W)                                                                       \
  template <typename T>                                                                                    \
  ATTR void forward_rows_##SUFFIX(const Job& job, int64_t n, int64_t t0, int64_t t1, float* scratch) {    \
    forward_rows<W, T>(job, n, t0, t1, scratch);                                                           \
  }                                                                                                        \
  template <typename T>                                                                                    \
  ATTR void backward_rows_##SUFFIX(const Job& job, int64_t n, int64_t t0, int64_t t1, float* scratch) {   \
    backward_rows<W, T>(job, n, t0, t1, scratch);                                                          \
  }                                                                                                        \
  template <typename T>                                                                                    \
  ATTR void bank_grad_chunk_##SUFFIX(const Job& job, size_t slot, const T* src, int64_t width,             \
                                     const float* coef, float factor, T* grad, int64_t c0, float* scratch) { \
    bank_grad_chunk<W, T>(job, slot, src, width, coef, factor, grad, c0, scratch);                         \
  }
MELO_LORA_ISA(baseline, , 4)
#if MELO_X86
MELO_LORA_ISA(avx2, MELO_TARGET_AVX2, 8)
MELO_LORA_ISA(avx512, MELO_TARGET_AVX512, 16)
#endif
#undef MELO_LORA_ISA

template <typename T>
struct Kernels {
  void (*forward_rows)(const Job&, int64_t, int64_t, int64_t, float*);
  void (*backward_rows)(const Job&, int64_t, int64_t, int64_t, float*);
  void (*bank_grad_chunk)(const Job&, size_t, const T*, int64_t, const float*, float, T*, int64_t, float*);
};

template <typename T>
Kernels<T> kernels() {
#if MELO_X86
  switch (detect_isa()) {
    case Isa::kAvx512: return {forward_rows_avx512<T>, backward_rows_avx512<T>, bank_grad_chunk_avx512<T>};
    case Isa::kAvx2: return {forward_rows_avx2<T>, backward_rows_avx2<T>, bank_grad_chunk_avx2<T>};
    default: break;
  }
#endif
  return {forward_rows_baseline<T>, backward_rows_baseline<T>, bank_grad_chunk_baseline<T>};
}

// Threads only pay off above this many multiply-adds (a decode step stays on the calling thread).
constexpr int64_t kMinParallelWork = int64_t{1} << 20;

int64_t lora_work(const BlockLoraDims& dm) {
  return dm.n_samples * dm.n_tokens * (dm.d_in + dm.d_out) * std::max<int64_t>(dm.rank, 1);
}

// Runs fn(thread_scratch, n, t0, t1) over every (sample, token tile), in parallel; only over the
// samples listed in `only` (ascending) when it is given.
template <typename Fn>
void for_each_token_tile(const BlockLoraDims& dm, int64_t scratch_floats, Fn fn,
                         const std::vector<int64_t>* only = nullptr) {
  const int64_t tiles = (dm.n_tokens + kTokenTile - 1) / kTokenTile;
  const int64_t n_samples = only != nullptr ? static_cast<int64_t>(only->size()) : dm.n_samples;
  const int64_t n_tasks = n_samples * tiles;
  if (n_tasks == 0) return;
  const int64_t work = dm.n_samples > 0 ? lora_work(dm) / dm.n_samples * n_samples : 0;
#pragma omp parallel num_threads(std::max(1, dm.num_threads)) if (n_tasks > 1 && work >= kMinParallelWork)
  {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    // Dynamic: a preempted thread delays one tile, not its whole share (rows are independent, so the
    // result does not depend on the schedule).
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t i = task / tiles, t0 = (task % tiles) * kTokenTile;
      fn(scratch.data(), only != nullptr ? (*only)[i] : i, t0, std::min(dm.n_tokens, t0 + kTokenTile));
    }
  }
}

// Out of place, or in place when out == base (the inference path: hidden is then null, rows of
// block -1 are left untouched and the other rows get bitwise the out-of-place values).
template <typename T>
std::string forward_typed(const T* x, const T* A, const T* B, const int64_t* ids, float scale, const T* base, T* out,
                          float* hidden, const BlockLoraDims& dm) {
  Plan plan;
  std::string err = make_plan(A, B, ids, dm, plan);
  if (!err.empty()) return err;
  const Kernels<T> kern = kernels<T>();
  const Job job{x, base, nullptr, out, hidden, nullptr, scale, &plan, &dm};
  const auto rows = [&](float* scratch, int64_t n, int64_t t0, int64_t t1) {
    kern.forward_rows(job, n, t0, t1, scratch);
  };
  if (base != nullptr && static_cast<const void*>(out) == static_cast<const void*>(base)) {
    // In place: unedited samples are already right; visit the edited ones only.
    std::vector<int64_t> edited;
    for (const auto& samples : plan.samples) edited.insert(edited.end(), samples.begin(), samples.end());
    std::sort(edited.begin(), edited.end());
    for_each_token_tile(dm, forward_scratch_floats(dm), rows, &edited);
  } else {
    for_each_token_tile(dm, forward_scratch_floats(dm), rows);
  }
  return "";
}

template <typename T>
std::string backward_typed(const T* grad_out, const T* x, const T* A, const T* B, const int64_t* ids, float scale,
                           const float* hidden, T* grad_x, T* grad_A, T* grad_B, const BlockLoraDims& dm) {
  if (grad_B != nullptr && hidden == nullptr) return "block_lora backward: grad_B needs the forward's hidden";
  Plan plan;
  std::string err = make_plan(A, B, ids, dm, plan);
  if (!err.empty()) return err;
  const Kernels<T> kern = kernels<T>();
  const bool rows_pass = grad_x != nullptr || grad_A != nullptr;  // both need grad_hidden
  std::vector<float> grad_hidden(rows_pass ? static_cast<size_t>(dm.n_samples * dm.n_tokens * dm.rank) : 0);
  const Job job{x, nullptr, grad_out, grad_x, const_cast<float*>(hidden), grad_hidden.data(), scale, &plan, &dm};
  if (rows_pass) {
    for_each_token_tile(dm, dm.d_in + dm.d_out, [&](float* scratch, int64_t n, int64_t t0, int64_t t1) {
      kern.backward_rows(job, n, t0, t1, scratch);
    });
  }
  if (grad_A == nullptr && grad_B == nullptr) return "";

  // Tasks of the bank pass: for each used block, the column chunks of grad_A then of grad_B.
  const int64_t chunks_a = grad_A != nullptr ? (dm.d_in + kColumnChunk - 1) / kColumnChunk : 0;
  const int64_t chunks_b = grad_B != nullptr ? (dm.d_out + kColumnChunk - 1) / kColumnChunk : 0;
  const int64_t per_block = chunks_a + chunks_b;
  const int64_t n_tasks = static_cast<int64_t>(plan.blocks.size()) * per_block;
#pragma omp parallel num_threads(std::max(1, dm.num_threads)) if (n_tasks > 1 && lora_work(dm) >= kMinParallelWork)
  {
    std::vector<float> scratch(static_cast<size_t>((dm.rank + 1) * kColumnChunk));
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const size_t slot = static_cast<size_t>(task / per_block);
      const int64_t c = task % per_block;
      if (c < chunks_a)
        kern.bank_grad_chunk(job, slot, x, dm.d_in, grad_hidden.data(), 1.0f, grad_A, c * kColumnChunk,
                             scratch.data());
      else
        kern.bank_grad_chunk(job, slot, grad_out, dm.d_out, hidden, scale, grad_B, (c - chunks_a) * kColumnChunk,
                             scratch.data());
    }
  }
  return "";
}

}  // namespace

std::string block_lora_forward(DType dtype, const void* x, const void* A, const void* B, const int64_t* block_ids,
                               float scale, const void* base, void* out, float* hidden, const BlockLoraDims& dims) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed(static_cast<const float*>(x), static_cast<const float*>(A), static_cast<const float*>(B),
                           block_ids, scale, static_cast<const float*>(base), static_cast<float*>(out), hidden, dims);
    case DType::kBFloat16:
      return forward_typed(static_cast<const bf16_t*>(x), static_cast<const bf16_t*>(A),
                           static_cast<const bf16_t*>(B), block_ids, scale, static_cast<const bf16_t*>(base),
                           static_cast<bf16_t*>(out), hidden, dims);
    case DType::kFloat16:
      return forward_typed(static_cast<const f16_t*>(x), static_cast<const f16_t*>(A), static_cast<const f16_t*>(B),
                           block_ids, scale, static_cast<const f16_t*>(base), static_cast<f16_t*>(out), hidden, dims);
  }
  return "block_lora: unsupported dtype";
}

std::string block_lora_backward(DType dtype, const void* grad_out, const void* x, const void* A, const void* B,
                                const int64_t* block_ids, float scale, const float* hidden, void* grad_x, void* grad_A,
                                void* grad_B, const BlockLoraDims& dims) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed(static_cast<const float*>(grad_out), static_cast<const float*>(x),
                            static_cast<const float*>(A), static_cast<const float*>(B), block_ids, scale, hidden,
                            static_cast<float*>(grad_x), static_cast<float*>(grad_A), static_cast<float*>(grad_B),
                            dims);
    case DType::kBFloat16:
      return backward_typed(static_cast<const bf16_t*>(grad_out), static_cast<const bf16_t*>(x),
                            static_cast<const bf16_t*>(A), static_cast<const bf16_t*>(B), block_ids, scale, hidden,
                            static_cast<bf16_t*>(grad_x), static_cast<bf16_t*>(grad_A), static_cast<bf16_t*>(grad_B),
                            dims);
    case DType::kFloat16:
      return backward_typed(static_cast<const f16_t*>(grad_out), static_cast<const f16_t*>(x),
                            static_cast<const f16_t*>(A), static_cast<const f16_t*>(B), block_ids, scale, hidden,
                            static_cast<f16_t*>(grad_x), static_cast<f16_t*>(grad_A), static_cast<f16_t*>(grad_B),
                            dims);
  }
  return "block_lora: unsupported dtype";
}

}  // namespace melo
