// Fused vector-database lookup: nearest center -> radius check -> nearest point of that cluster.
//
// Stage 1 streams the centers tile by tile (a tile is converted to fp32 once if stored in bf16/fp16)
// and scores each (query, center) pair with ||c||^2 - 2 q.c, ||c||^2 computed once per tile. The
// score is only an estimate (fp32 sums in a different order than the exact distance), so instead of a
// single running best each query keeps every center that could still be the nearest one: a running
// upper bound U = min(score + err) and the candidates whose score - err <= U, where err bounds the
// rounding error of the score. That is the "best and second best" of the design generalised so that
// the result is provably the reference's, not just usually. No [Q, C] matrix is ever formed.
//
// Stage 2 (per query) re-checks the candidates with the reference's exact distance (fp32 difference,
// accumulated in double), keeps the lowest index among exact ties, applies the radius, and scans the
// points of the chosen cluster (CSR) the same exact way.
//
// Work split: the centers are cut into chunks, a few per thread (each center is read from memory
// once, which is what matters for a bandwidth-bound scan) and, when there are few centers, the
// queries into groups; per-chunk candidate lists are merged in stage 2 (per query).
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "melo_kernels.h"

namespace melo {
namespace {

constexpr int64_t kTileCenters = 48;  // centers per tile (converted from 16 bits at once, L2 resident)
constexpr int64_t kMinQueriesPerGroup = 4;  // split queries among threads only in blocks this large
constexpr int64_t kChunksPerThread = 4;  // center chunks per thread (dynamic schedule)
constexpr int64_t kMinParallelWork = int64_t{1} << 21;  // multiply-adds (Q * C * d) worth a thread team
constexpr size_t kMaxCandidates = 64;  // prune a candidate list when it grows past this (at least)

struct Candidate {
  float lower;  // score - err: no center with a lower bound above U can be the nearest
  int64_t index;
};

struct QueryState {
  float upper = std::numeric_limits<float>::infinity();
  std::vector<Candidate> candidates;
  size_t prune_at = kMaxCandidates;  // doubles when pruning frees little (many near-ties): amortized O(1)
};

// Dot products of MQ rows of q with MC rows of c (row stride d): MQ * MC vector accumulators, W
// lanes each, so every loaded vector of c is used MQ times and every one of q MC times.
template <int W, int MQ, int MC>
MELO_INLINE void dot_block(const float* q, const float* c, int64_t d, float* out) {
  VecF<W> acc[MQ][MC];
  for (int a = 0; a < MQ; ++a)
    for (int b = 0; b < MC; ++b) acc[a][b] = VecF<W>{};
  int64_t i = 0;
  for (; i + W <= d; i += W) {
    VecF<W> cv[MC];
    for (int b = 0; b < MC; ++b) cv[b] = load_vec<W>(c + b * d + i);
    for (int a = 0; a < MQ; ++a) {
      const VecF<W> qv = load_vec<W>(q + a * d + i);
      for (int b = 0; b < MC; ++b) acc[a][b] += qv * cv[b];
    }
  }
  for (int a = 0; a < MQ; ++a) {
    for (int b = 0; b < MC; ++b) {
      float s = reduce_vec<W>(acc[a][b]);
      for (int64_t j = i; j < d; ++j) s += q[a * d + j] * c[b * d + j];
      out[a * MC + b] = s;
    }
  }
}

template <typename T>
MELO_INLINE void convert_rows(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(src[i]);
}

struct Stage1Task {
  const float* queries;  // [Q, d] fp32
  const float* query_norms;  // [Q] ||q||
  const void* centers;
  int64_t dim, q_begin, q_end, c_begin, c_end;
  float gamma;  // relative rounding-error bound of a score (see error_bound)
  QueryState* states;  // indexed by query
};

void offer(QueryState& st, float score, float err, int64_t index) {
  const float lower = score - err;
  if (!(lower <= st.upper)) return;  // also drops NaN scores, which the reference never picks
  st.candidates.push_back({lower, index});
  st.upper = std::min(st.upper, score + err);
  if (st.candidates.size() > st.prune_at) {
    const float upper = st.upper;
    auto& cand = st.candidates;
    cand.erase(std::remove_if(cand.begin(), cand.end(), [upper](const Candidate& x) { return x.lower > upper; }),
               cand.end());
    st.prune_at = std::max(kMaxCandidates, 2 * cand.size());
  }
}

// Scores of the queries [q_begin, q_end) against the centers [c_begin, c_end). The register block is
// MQ queries x MC centers; the MC center rows stay in L1 while all query blocks stream past them.
template <int W, int MQ, int MC, typename T>
MELO_INLINE void stage1_impl(const Stage1Task& task) {
  const int64_t d = task.dim;
  const T* centers = static_cast<const T*>(task.centers);
  std::vector<float> tile_buf;
  if (!std::is_same<T, float>::value) tile_buf.resize(static_cast<size_t>(kTileCenters * d));
  float norms[kTileCenters], cnorms[kTileCenters];
  float dots[MQ * MC];

  for (int64_t t0 = task.c_begin; t0 < task.c_end; t0 += kTileCenters) {
    const int64_t nt = std::min(kTileCenters, task.c_end - t0);
    const float* tile;
    if constexpr (std::is_same<T, float>::value) {
      tile = centers + t0 * d;
    } else {
      convert_rows(centers + t0 * d, nt * d, tile_buf.data());
      tile = tile_buf.data();
    }
    for (int64_t j = 0; j < nt; ++j) {
      dot_block<W, 1, 1>(tile + j * d, tile + j * d, d, &norms[j]);
      cnorms[j] = std::sqrt(norms[j]);
    }
    // Feed a block of scores to the candidate lists (cheap reject first: most pairs are far).
    auto update = [&](int64_t q, int nq, int64_t j, int nc) {
      for (int a = 0; a < nq; ++a) {
        QueryState& st = task.states[q + a];
        const float qerr = 2.0f * task.gamma * task.query_norms[q + a];
        for (int b = 0; b < nc; ++b) {
          const float score = norms[j + b] - 2.0f * dots[a * nc + b];
          const float err = task.gamma * norms[j + b] + qerr * cnorms[j + b];
          if (score - err <= st.upper) offer(st, score, err, t0 + j + b);
        }
      }
    };
    int64_t j = 0;
    for (; j + MC <= nt; j += MC) {
      const float* cp = tile + j * d;
      int64_t q = task.q_begin;
      for (; q + MQ <= task.q_end; q += MQ) {
        dot_block<W, MQ, MC>(task.queries + q * d, cp, d, dots);
        update(q, MQ, j, MC);
      }
      for (; q < task.q_end; ++q) {  // leftover queries (all of them when Q < MQ)
        dot_block<W, 1, MC>(task.queries + q * d, cp, d, dots);
        update(q, 1, j, MC);
      }
    }
    for (; j < nt; ++j) {  // leftover centers of the tile
      int64_t q = task.q_begin;
      for (; q + MQ <= task.q_end; q += MQ) {
        dot_block<W, MQ, 1>(task.queries + q * d, tile + j * d, d, dots);
        update(q, MQ, j, 1);
      }
      for (; q < task.q_end; ++q) {
        dot_block<W, 1, 1>(task.queries + q * d, tile + j * d, d, dots);
        update(q, 1, j, 1);
      }
    }
  }
}

// Relative bound on the rounding error of a score ||c||^2 - 2 q.c summed in fp32 over d terms in
// lanes (>= 4 of them), as a multiple of ||c||^2 + 2 ||q|| ||c||; a factor 2 of margin on top.
float error_bound(int64_t d) {
  const double unit = std::ldexp(1.0, -24);
  return static_cast<float>(2.0 * (static_cast<double>(d) / 4.0 + 16.0) * unit);
}

// The reference's distance: fp32 difference (as `query - center.float()`), then the norm. The sum of
// squares is accumulated in double so it is (nearly always) the correctly rounded fp32 norm.
MELO_INLINE float exact_distance(const float* q, const float* v, int64_t d) {
  typedef float f8 __attribute__((vector_size(32)));
  typedef double d8 __attribute__((vector_size(64)));
  d8 acc{};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    f8 a, b;
    std::memcpy(&a, q + i, sizeof a);
    std::memcpy(&b, v + i, sizeof b);
    const d8 diff = __builtin_convertvector(a - b, d8);
    acc += diff * diff;
  }
  double s = 0.0;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; i < d; ++i) {
    const double diff = static_cast<double>(q[i] - v[i]);
    s += diff * diff;
  }
  return static_cast<float>(std::sqrt(s));
}

struct Stage2Args {
  const VecdbSearchArgs* args;
  const float* queries;  // [Q, d] fp32
  const std::vector<QueryState>* states;  // [chunk][query]
  int64_t n_chunks;
};

template <typename T>
MELO_INLINE float exact_distance_row(const float* q, const void* rows, int64_t row, int64_t d, float* buf) {
  const T* v = static_cast<const T*>(rows) + row * d;
  if constexpr (std::is_same<T, float>::value) {
    return exact_distance(q, v, d);
  } else {
    convert_rows(v, d, buf);
    return exact_distance(q, buf, d);
  }
}

MELO_INLINE float exact_distance_any(const float* q, const void* rows, DType dtype, int64_t row, int64_t d,
                                     float* buf) {
  switch (dtype) {
    case DType::kBFloat16: return exact_distance_row<bf16_t>(q, rows, row, d, buf);
    case DType::kFloat16: return exact_distance_row<f16_t>(q, rows, row, d, buf);
    default: return exact_distance_row<float>(q, rows, row, d, buf);
  }
}

// Stage 2 for query q: exact re-check of the surviving candidates (strict '<' plus the index rule =
// argmin's ties), the radius, then the nearest point of the chosen cluster. buf: d floats.
MELO_INLINE void stage2_impl(const Stage2Args& s2, int64_t q, float* buf) {
  const VecdbSearchArgs& args = *s2.args;
  const int64_t nq = args.n_queries, d = args.dim;
  const float* qp = s2.queries + q * d;
  const std::vector<QueryState>& states = *s2.states;
  float upper = std::numeric_limits<float>::infinity();
  for (int64_t ci = 0; ci < s2.n_chunks; ++ci) upper = std::min(upper, states[ci * nq + q].upper);
  int64_t best = -1;
  float best_dist = std::numeric_limits<float>::infinity();
  for (int64_t ci = 0; ci < s2.n_chunks; ++ci) {
    for (const Candidate& cand : states[ci * nq + q].candidates) {
      if (cand.lower > upper) continue;
      const float dist = exact_distance_any(qp, args.centers, args.centers_dtype, cand.index, d, buf);
      if (dist < best_dist || (dist == best_dist && cand.index < best)) {
        best = cand.index;
        best_dist = dist;
      }
    }
  }
  if (best < 0 || static_cast<double>(best_dist) > args.radii[best]) {
    args.out[q] = -1;
    return;
  }
  int64_t best_point = -1;
  float best_point_dist = std::numeric_limits<float>::infinity();
  for (int64_t p = args.point_offsets[best]; p < args.point_offsets[best + 1]; ++p) {
    const float dist = exact_distance_any(qp, args.points, args.points_dtype, p, d, buf);
    if (dist < best_point_dist) {
      best_point = p;
      best_point_dist = dist;
    }
  }
  args.out[q] = best_point >= 0 ? args.point_blocks[best_point] : -1;
}

// One instantiation per instruction set (and center dtype for stage 1); the attribute makes the
// compiler use that instruction set for the inlined template bodies. Register blocks fill the vector
// registers: 4 x 6 accumulators of 32 zmm, 4 x 3 of 16 ymm / xmm.
#define MELO_STAGES(SUFFIX, ATTR, W, MQ, MC)                                           \
  ATTR void stage1_##SUFFIX(const Stage1Task& task, DType dtype) {                    \
    switch (dtype) {                                                                   \
      case DType::kFloat32: stage1_impl<W, MQ, MC, float>(task); break;               \
      case DType::kBFloat16: stage1_impl<W, MQ, MC, bf16_t>(task); break;             \
      case DType::kFloat16: stage1_impl<W, MQ, MC, f16_t>(task); break;               \
    }                                                                                  \
  }                                                                                    \
  ATTR void stage2_##SUFFIX(const Stage2Args& s2, int64_t q, float* buf) { stage2_impl(s2, q, buf); }
MELO_STAGES(baseline, , 4, 4, 3)
#if MELO_X86
MELO_STAGES(avx2, MELO_TARGET_AVX2, 8, 4, 3)
MELO_STAGES(avx512, MELO_TARGET_AVX512, 16, 4, 6)
#endif
#undef MELO_STAGES

struct Stages {
  void (*stage1)(const Stage1Task&, DType);
  void (*stage2)(const Stage2Args&, int64_t, float*);
};

Stages stages() {
#if MELO_X86
  switch (detect_isa()) {
    case Isa::kAvx512: return {stage1_avx512, stage2_avx512};
    case Isa::kAvx2: return {stage1_avx2, stage2_avx2};
    default: break;
  }
#endif
  return {stage1_baseline, stage2_baseline};
}

}  // namespace

std::string vecdb_search(const VecdbSearchArgs& args) {
  const int64_t nq = args.n_queries, d = args.dim, nc = args.n_centers;
  if (nq == 0) return "";
  if (nc == 0 || args.n_points == 0) {  // empty database (or no points at all): nothing to route to
    std::fill(args.out, args.out + nq, int64_t{-1});
    return "";
  }
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t lo = args.point_offsets[c], hi = args.point_offsets[c + 1];
    if (lo < 0 || hi < lo || hi > args.n_points)
      return "vecdb_search: point_offsets must be non-decreasing within [0, " + std::to_string(args.n_points) +
             "]; cluster " + std::to_string(c) + " has [" + std::to_string(lo) + ", " + std::to_string(hi) + ")";
  }
  const int nthreads = std::max(1, args.num_threads);

  // Queries in fp32 (the reference's `queries.float()`) and their norms (for the error bound).
  std::vector<float> queries(static_cast<size_t>(nq * d));
  switch (args.queries_dtype) {
    case DType::kFloat32: std::copy_n(static_cast<const float*>(args.queries), nq * d, queries.data()); break;
    case DType::kBFloat16: convert_rows(static_cast<const bf16_t*>(args.queries), nq * d, queries.data()); break;
    case DType::kFloat16: convert_rows(static_cast<const f16_t*>(args.queries), nq * d, queries.data()); break;
  }
  std::vector<float> query_norms(static_cast<size_t>(nq));
  for (int64_t q = 0; q < nq; ++q) {
    double s = 0.0;
    for (int64_t i = 0; i < d; ++i) s += static_cast<double>(queries[q * d + i]) * queries[q * d + i];
    query_norms[q] = static_cast<float>(std::sqrt(s));
  }

  // Work split: center chunks (several per thread, handed out dynamically, so a thread the OS
  // preempts delays the scan by one chunk, not by its whole share), then query groups when there are
  // too few centers. Small lookups (a decode step) stay on the calling thread.
  const int64_t threads = nq * nc * d >= kMinParallelWork ? nthreads : 1;
  const int64_t n_chunks = std::clamp<int64_t>((nc + 255) / 256, 1, threads * kChunksPerThread);
  const int64_t n_groups = std::clamp<int64_t>((threads * kChunksPerThread + n_chunks - 1) / n_chunks, 1,
                                               (nq + kMinQueriesPerGroup - 1) / kMinQueriesPerGroup);
  const int64_t chunk = (nc + n_chunks - 1) / n_chunks;
  const int64_t group = (nq + n_groups - 1) / n_groups;
  std::vector<QueryState> states(static_cast<size_t>(n_chunks * nq));  // [chunk][query]
  const float gamma = error_bound(d);
  const int64_t n_tasks = n_chunks * n_groups;
  const Stages fns = stages();

#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && n_tasks > 1)
  for (int64_t t = 0; t < n_tasks; ++t) {
    const int64_t ci = t % n_chunks, gi = t / n_chunks;
    Stage1Task task;
    task.queries = queries.data();
    task.query_norms = query_norms.data();
    task.centers = args.centers;
    task.dim = d;
    task.q_begin = std::min(nq, gi * group);
    task.q_end = std::min(nq, (gi + 1) * group);
    task.c_begin = std::min(nc, ci * chunk);
    task.c_end = std::min(nc, (ci + 1) * chunk);
    task.gamma = gamma;
    task.states = states.data() + ci * nq;
    fns.stage1(task, args.centers_dtype);
  }

  // Stage 2 reads a few rows per query: worth threads only for many queries.
  const Stage2Args s2{&args, queries.data(), &states, n_chunks};
  const int stage2_threads = nq * d >= kMinParallelWork / 8 ? nthreads : 1;
#pragma omp parallel num_threads(stage2_threads) if (stage2_threads > 1)
  {
    std::vector<float> buf(static_cast<size_t>(d));
#pragma omp for schedule(dynamic, 16)
    for (int64_t q = 0; q < nq; ++q) fns.stage2(s2, q, buf.data());
  }
  return "";
}

}  // namespace melo
