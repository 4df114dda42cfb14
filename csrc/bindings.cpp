// The only file that knows about torch: checks and normalises tensors (CPU, contiguous, a dtype the
// kernels take), allocates outputs, releases the GIL and calls the framework-free kernels.
// Shapes were validated by melo_fast.ops; the checks here guard direct calls of melo_fast._C.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "melo_kernels.h"

namespace {

bool is_kernel_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

melo::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return melo::DType::kBFloat16;
    case at::kHalf: return melo::DType::kFloat16;
    default: return melo::DType::kFloat32;
  }
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": the cpp backend runs on CPU tensors; ", name, " is on ", t.device());
}

// fp32/bf16/fp16 stay as they are (converted to fp32 inside the kernel); other floats become fp32,
// like the reference's `.float()`.
at::Tensor search_operand(const at::Tensor& t, const char* name) {
  check_cpu(t, "vecdb_search", name);
  TORCH_CHECK(t.is_floating_point(), "vecdb_search: ", name, " must be a float tensor, got ", t.scalar_type());
  return (is_kernel_float(t) ? t : t.to(at::kFloat)).contiguous();
}

at::Tensor index_operand(const at::Tensor& t, const char* op, const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  return t.contiguous();
}

at::Tensor vecdb_search(const at::Tensor& queries, const at::Tensor& centers, const at::Tensor& radii,
                        const at::Tensor& point_offsets, const at::Tensor& points, const at::Tensor& point_blocks) {
  TORCH_CHECK(queries.dim() == 2 && centers.dim() == 2 && points.dim() == 2,
              "vecdb_search: queries, centers and points must be 2-D");
  const int64_t d = queries.size(1), nc = centers.size(0), np = points.size(0);
  TORCH_CHECK(centers.size(1) == d && points.size(1) == d, "vecdb_search: centers and points must have d = ", d);
  TORCH_CHECK(radii.numel() == nc && point_offsets.numel() == nc + 1 && point_blocks.numel() == np,
              "vecdb_search: radii [C], point_offsets [C + 1] and point_blocks [P] do not match centers/points");
  const at::Tensor q = search_operand(queries, "queries");
  const at::Tensor c = search_operand(centers, "centers");
  const at::Tensor p = search_operand(points, "points");
  check_cpu(radii, "vecdb_search", "radii");
  const at::Tensor r = radii.to(at::kDouble).contiguous();
  const at::Tensor off = index_operand(point_offsets, "vecdb_search", "point_offsets");
  const at::Tensor pb = index_operand(point_blocks, "vecdb_search", "point_blocks");
  at::Tensor out = at::empty({q.size(0)}, q.options().dtype(at::kLong));

  melo::VecdbSearchArgs args;
  args.queries = q.data_ptr();
  args.queries_dtype = kernel_dtype(q);
  args.centers = c.data_ptr();
  args.centers_dtype = kernel_dtype(c);
  args.radii = r.data_ptr<double>();
  args.point_offsets = off.data_ptr<int64_t>();
  args.points = p.data_ptr();
  args.points_dtype = kernel_dtype(p);
  args.point_blocks = pb.data_ptr<int64_t>();
  args.n_queries = q.size(0);
  args.dim = d;
  args.n_centers = nc;
  args.n_points = np;
  args.out = out.data_ptr<int64_t>();
  args.num_threads = at::get_num_threads();
  std::string err;
  {
    pybind11::gil_scoped_release no_gil;
    err = melo::vecdb_search(args);
  }
  TORCH_CHECK(err.empty(), err);
  return out;
}

melo::BlockLoraDims lora_dims(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(x.dim() == 3 && A.dim() == 3 && B.dim() == 3, "block_lora: x, A and B must be 3-D");
  TORCH_CHECK(A.size(2) == x.size(2) && B.size(0) == A.size(0) && B.size(1) == A.size(1),
              "block_lora: A must be [n_blocks, k, d_in] and B [n_blocks, k, d_out]");
  TORCH_CHECK(is_kernel_float(x) && A.scalar_type() == x.scalar_type() && B.scalar_type() == x.scalar_type(),
              "block_lora: x, A and B must share one dtype among float32/bfloat16/float16, got ", x.scalar_type(),
              ", ", A.scalar_type(), ", ", B.scalar_type());
  melo::BlockLoraDims dm;
  dm.n_samples = x.size(0);
  dm.n_tokens = x.size(1);
  dm.d_in = x.size(2);
  dm.d_out = B.size(2);
  dm.rank = A.size(1);
  dm.n_blocks = A.size(0);
  dm.num_threads = at::get_num_threads();
  return dm;
}

// Returns (out, hidden); hidden = x @ A[b].T as fp32 [N, T, k] when save_hidden (for the backward).
std::tuple<at::Tensor, std::optional<at::Tensor>> block_lora_forward(const at::Tensor& x, const at::Tensor& A,
                                                                     const at::Tensor& B, const at::Tensor& block_ids,
                                                                     double scale,
                                                                     const std::optional<at::Tensor>& base,
                                                                     bool save_hidden) {
  check_cpu(x, "block_lora", "x");
  check_cpu(A, "block_lora", "A");
  check_cpu(B, "block_lora", "B");
  const melo::BlockLoraDims dm = lora_dims(x, A, B);
  const at::Tensor ids = index_operand(block_ids, "block_lora", "block_ids");
  TORCH_CHECK(ids.numel() == dm.n_samples, "block_lora: block_ids must have one entry per sample");
  const at::Tensor xc = x.contiguous(), Ac = A.contiguous(), Bc = B.contiguous();
  at::Tensor basec;
  if (base.has_value()) {
    check_cpu(*base, "block_lora", "base");
    TORCH_CHECK(base->scalar_type() == x.scalar_type(), "block_lora: base must have x's dtype");
    TORCH_CHECK(base->sizes() == at::IntArrayRef({dm.n_samples, dm.n_tokens, dm.d_out}),
                "block_lora: base must be [N, T, d_out]");
    basec = base->contiguous();
  }
  at::Tensor out = at::empty({dm.n_samples, dm.n_tokens, dm.d_out}, x.options());
  std::optional<at::Tensor> hidden;
  if (save_hidden) hidden = at::empty({dm.n_samples, dm.n_tokens, dm.rank}, x.options().dtype(at::kFloat));
  std::string err;
  {
    pybind11::gil_scoped_release no_gil;
    err = melo::block_lora_forward(kernel_dtype(xc), xc.data_ptr(), Ac.data_ptr(), Bc.data_ptr(),
                                   ids.data_ptr<int64_t>(), static_cast<float>(scale),
                                   basec.defined() ? basec.data_ptr() : nullptr, out.data_ptr(),
                                   hidden ? hidden->data_ptr<float>() : nullptr, dm);
  }
  TORCH_CHECK(err.empty(), err);
  return {out, hidden};
}

// In place, for inference: base[n] += scale * (x[n] @ A[b].T) @ B[b] for the samples with b >= 0;
// rows of block -1 are not touched. Returns base. base must be contiguous (the kernel writes its
// memory); its version counter is bumped first, so an inference tensor outside inference mode is
// refused before anything is written, like any in-place torch op.
at::Tensor block_lora_inplace(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& block_ids, double scale, at::Tensor base) {
  check_cpu(x, "block_lora", "x");
  check_cpu(A, "block_lora", "A");
  check_cpu(B, "block_lora", "B");
  check_cpu(base, "block_lora", "base");
  const melo::BlockLoraDims dm = lora_dims(x, A, B);
  const at::Tensor ids = index_operand(block_ids, "block_lora", "block_ids");
  TORCH_CHECK(ids.numel() == dm.n_samples, "block_lora: block_ids must have one entry per sample");
  TORCH_CHECK(base.scalar_type() == x.scalar_type(), "block_lora: base must have x's dtype");
  TORCH_CHECK(base.sizes() == at::IntArrayRef({dm.n_samples, dm.n_tokens, dm.d_out}),
              "block_lora: base must be [N, T, d_out]");
  TORCH_CHECK(base.is_contiguous(), "block_lora: in place needs a contiguous base");
  const at::Tensor xc = x.contiguous(), Ac = A.contiguous(), Bc = B.contiguous();
  base.unsafeGetTensorImpl()->bump_version();
  std::string err;
  {
    pybind11::gil_scoped_release no_gil;
    err = melo::block_lora_forward(kernel_dtype(xc), xc.data_ptr(), Ac.data_ptr(), Bc.data_ptr(),
                                   ids.data_ptr<int64_t>(), static_cast<float>(scale), base.data_ptr(),
                                   base.data_ptr(), nullptr, dm);
  }
  TORCH_CHECK(err.empty(), err);
  return base;
}

// Returns (grad_x, grad_A, grad_B), each None unless asked for. grad_A / grad_B are zero outside
// the blocks present in block_ids.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> block_lora_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& block_ids, double scale, const std::optional<at::Tensor>& hidden, bool need_x, bool need_A,
    bool need_B) {
  check_cpu(grad_out, "block_lora backward", "grad_out");
  check_cpu(x, "block_lora backward", "x");
  check_cpu(A, "block_lora backward", "A");
  check_cpu(B, "block_lora backward", "B");
  const melo::BlockLoraDims dm = lora_dims(x, A, B);
  const at::Tensor ids = index_operand(block_ids, "block_lora backward", "block_ids");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.sizes() == at::IntArrayRef({dm.n_samples, dm.n_tokens, dm.d_out}),
              "block_lora backward: grad_out must be [N, T, d_out] in x's dtype");
  at::Tensor hid;
  if (need_B) {
    TORCH_CHECK(hidden.has_value() && hidden->scalar_type() == at::kFloat &&
                    hidden->numel() == dm.n_samples * dm.n_tokens * dm.rank,
                "block_lora backward: grad_B needs the forward's fp32 hidden [N, T, k]");
    hid = hidden->contiguous();
  }
  const at::Tensor g = grad_out.contiguous(), xc = x.contiguous(), Ac = A.contiguous(), Bc = B.contiguous();
  std::optional<at::Tensor> gx, gA, gB;
  if (need_x) gx = at::empty_like(xc);
  if (need_A) gA = at::zeros_like(Ac);
  if (need_B) gB = at::zeros_like(Bc);
  std::string err;
  {
    pybind11::gil_scoped_release no_gil;
    err = melo::block_lora_backward(kernel_dtype(xc), g.data_ptr(), xc.data_ptr(), Ac.data_ptr(), Bc.data_ptr(),
                                    ids.data_ptr<int64_t>(), static_cast<float>(scale),
                                    hid.defined() ? hid.data_ptr<float>() : nullptr, gx ? gx->data_ptr() : nullptr,
                                    gA ? gA->data_ptr() : nullptr, gB ? gB->data_ptr() : nullptr, dm);
  }
  TORCH_CHECK(err.empty(), err);
  return {gx, gA, gB};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "melo_fast C++ CPU kernels (OpenMP); use them through melo_fast.ops";
  m.def("vecdb_search", &vecdb_search, "Fused nearest-center / radius / nearest-point lookup", pybind11::arg("queries"),
        pybind11::arg("centers"), pybind11::arg("radii"), pybind11::arg("point_offsets"), pybind11::arg("points"),
        pybind11::arg("point_blocks"));
  m.def("block_lora_forward", &block_lora_forward, "Block LoRA forward; returns (out, hidden or None)",
        pybind11::arg("x"), pybind11::arg("A"), pybind11::arg("B"), pybind11::arg("block_ids"), pybind11::arg("scale"),
        pybind11::arg("base"), pybind11::arg("save_hidden"));
  m.def("block_lora_inplace", &block_lora_inplace,
        "Block LoRA forward written into base (inference; block -1 rows untouched); returns base",
        pybind11::arg("x"), pybind11::arg("A"), pybind11::arg("B"), pybind11::arg("block_ids"), pybind11::arg("scale"),
        pybind11::arg("base"));
  m.def("block_lora_backward", &block_lora_backward, "Block LoRA backward; returns (grad_x, grad_A, grad_B)",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("A"), pybind11::arg("B"),
        pybind11::arg("block_ids"), pybind11::arg("scale"), pybind11::arg("hidden"), pybind11::arg("need_x"),
        pybind11::arg("need_A"), pybind11::arg("need_B"));
  m.def("isa", [] { return std::string(melo::isa_name(melo::detect_isa())); },
        "Instruction set the kernels run with on this CPU (baseline, avx2, avx512)");
}
