// Framework-free CPU kernels of melo_fast (no torch types here: raw pointers, sizes, a dtype tag).
//
// bindings.cpp checks tensors and calls these; the kernels trust their arguments except where noted
// (they return a non-empty error string for data-dependent errors such as an out-of-range block id).
//
// Portability: the extension is built with plain -O3 (no -march=native), so the hot loops are written
// for the auto-vectorizer and compiled several times with GCC/Clang `target` attributes (AVX-512,
// AVX2+FMA, baseline); the best one the running CPU supports is chosen once at run time.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace melo {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "?";
}

// ---- scalar conversions (bit-exact with torch: round to nearest even, NaN stays NaN) --------------

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {  // subnormal half: normalize
    int shift = 0;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      ++shift;
    }
    mant &= 0x3ffu;
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // result is subnormal (or zero) in half
    if (abs < 0x33000000u) return sign;  // below half the smallest subnormal: +-0
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t mid = 1u << (shift - 1u);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t half = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;
  return sign | static_cast<uint16_t>(half);
}

// Element types: float, or a 16-bit float stored as uint16_t and tagged by these structs.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) { return bf16_to_f32(v.bits); }
inline float to_f32(f16_t v) { return f16_to_f32(v.bits); }

template <typename T>
inline T from_f32(float v);
template <>
inline float from_f32<float>(float v) { return v; }
template <>
inline bf16_t from_f32<bf16_t>(float v) { return bf16_t{f32_to_bf16(v)}; }
template <>
inline f16_t from_f32<f16_t>(float v) { return f16_t{f32_to_f16(v)}; }

// ---- run-time ISA choice ------------------------------------------------------------------------

// The hot loops are templates over the lane count W (floats per vector register) instantiated in
// functions carrying a `target` attribute; MELO_TARGET_* expand to nothing off x86.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MELO_X86 1
#define MELO_TARGET_AVX2 __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define MELO_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#else
#define MELO_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,prefer-vector-width=512")))
#endif
#else
#define MELO_X86 0
#define MELO_TARGET_AVX2
#define MELO_TARGET_AVX512
#endif
#if defined(__GNUC__) || defined(__clang__)
#define MELO_INLINE inline __attribute__((always_inline))
#else
#define MELO_INLINE inline
#endif

// W-lane float vectors (GCC/Clang vector extensions, portable: the compiler lowers them to whatever
// the enclosing function's target has, e.g. one zmm register per VecF<16> under AVX-512, four xmm
// under baseline x86-64, NEON on ARM). Plain loops are left to the auto-vectorizer; these are for
// the multi-accumulator reductions (dot products), which it does not vectorize without -ffast-math.
template <int W>
struct VecOf;
template <>
struct VecOf<4> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct VecOf<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<16> {
  typedef float type __attribute__((vector_size(64)));
};
template <int W>
using VecF = typename VecOf<W>::type;

template <int W>
MELO_INLINE VecF<W> load_vec(const float* p) {  // unaligned load
  VecF<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
MELO_INLINE float reduce_vec(VecF<W> v) {
  float s = 0.0f;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// Best instruction set of this CPU, capped by MELO_FAST_ISA=baseline|avx2|avx512 when set (to compare
// or test the fallbacks). Detected once.
inline Isa detect_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#if MELO_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      best = Isa::kAvx512;
#endif
    const char* cap = std::getenv("MELO_FAST_ISA");
    if (cap != nullptr) {
      if (std::strcmp(cap, "baseline") == 0) best = Isa::kBaseline;
      if (std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) best = Isa::kAvx2;
    }
    return best;
  }();
  return isa;
}

// ---- vector database lookup ---------------------------------------------------------------------

struct VecdbSearchArgs {
  const void* queries;  // [Q, d]
  DType queries_dtype;
  const void* centers;  // [C, d]
  DType centers_dtype;
  const double* radii;  // [C], widened to double: the reference compares Python floats
  const int64_t* point_offsets;  // [C + 1] CSR
  const void* points;  // [P, d]
  DType points_dtype;
  const int64_t* point_blocks;  // [P]
  int64_t n_queries, dim, n_centers, n_points;
  int64_t* out;  // [Q]
  int num_threads;
};

// Nearest center (exact fp32 Euclidean distance, ties to the lowest index), radius check, nearest
// point of that cluster. Returns "" or an error message (malformed CSR offsets).
std::string vecdb_search(const VecdbSearchArgs& args);

// ---- block LoRA ----------------------------------------------------------------------------------

struct BlockLoraDims {
  int64_t n_samples, n_tokens, d_in, d_out, rank, n_blocks;
  int num_threads;
};

// out[n] = base[n] + scale * (x[n] @ A[b].T) @ B[b] (b = block_ids[n]); out[n] = base[n] bit for bit
// (or 0 without base) when b == -1. `hidden` ([N*T, k] fp32, may be null) receives x @ A[b].T for
// the backward pass. Returns "" or an error message (block id out of range).
std::string block_lora_forward(DType dtype, const void* x, const void* A, const void* B, const int64_t* block_ids,
                               float scale, const void* base, void* out, float* hidden, const BlockLoraDims& dims);

// Gradients of block_lora_forward. Any of grad_x / grad_A / grad_B may be null (not needed).
// grad_A / grad_B must be zero-filled by the caller: only the blocks present in block_ids are written,
// each element by one task summing samples and tokens in a fixed order (deterministic for any thread
// count). `hidden` is the forward's x @ A[b].T (needed for grad_B only).
std::string block_lora_backward(DType dtype, const void* grad_out, const void* x, const void* A, const void* B,
                                const int64_t* block_ids, float scale, const float* hidden, void* grad_x, void* grad_A,
                                void* grad_B, const BlockLoraDims& dims);

}  // namespace melo
