// oneDNN rows: batch_normalization_forward/backward primitives created once
// per row, executed on buffers of the shared arena.
#include <oneapi/dnnl/dnnl.hpp>
#include <unordered_map>

#include "workload.h"

namespace bnorm_bench {
namespace {

using dnnl::memory;
using dnnl::normalization_flags;
using dnnl::prop_kind;

constexpr float kEps = 1e-5f;

dnnl::engine& cpu_engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

memory::desc data_desc(layout l, const problem& p) {
  if (l == layout::nc) return {{p.n, p.c}, memory::data_type::f32, memory::format_tag::nc};
  return {{p.n, p.c, p.h, p.w},
          memory::data_type::f32,
          l == layout::nhwc ? memory::format_tag::nhwc : memory::format_tag::nchw};
}

memory channel_memory(int64_t c, float value) {
  memory m({{c}, memory::data_type::f32, memory::format_tag::x}, cpu_engine());
  float* p = static_cast<float*>(m.get_data_handle());
  for (int64_t i = 0; i < c; ++i) p[i] = value;
  return m;
}

void run_onednn_row(benchmark::State& state, const op& o, layout l, const problem& p) {
  const arena& a = arena::get();
  dnnl::engine& eng = cpu_engine();
  dnnl::stream strm(eng);
  const memory::desc md = data_desc(l, p);

  normalization_flags flags = normalization_flags::use_scale | normalization_flags::use_shift;
  if (o.relu) flags = flags | normalization_flags::fuse_norm_relu;

  memory src(md, eng, a.x()), dst(md, eng, a.y()), diff_dst(md, eng, a.dy());
  memory scale = channel_memory(p.c, 1.25f), shift = channel_memory(p.c, 0.5f);
  memory mean = channel_memory(p.c, 0.1f), var = channel_memory(p.c, 1.5f);
  memory diff_scale = channel_memory(p.c, 0.0f), diff_shift = channel_memory(p.c, 0.0f);

  auto execute = [&strm](dnnl::primitive& prim, const std::unordered_map<int, memory>& args) {
    return [&strm, &prim, &args]() -> run_result {
      prim.execute(strm, args);
      strm.wait();
      return {true, {}};
    };
  };

  if (o.kind == op_kind::fwd_inference) {
    dnnl::batch_normalization_forward::desc d(prop_kind::forward_inference, md, kEps,
                                              flags | normalization_flags::use_global_stats);
    dnnl::batch_normalization_forward::primitive_desc pd(d, eng);
    dnnl::primitive prim = dnnl::batch_normalization_forward(pd);
    const std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, src},     {DNNL_ARG_DST, dst},
                                                  {DNNL_ARG_MEAN, mean},   {DNNL_ARG_VARIANCE, var},
                                                  {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift}};
    measure(state, o.kind, p, execute(prim, args));
    return;
  }

  dnnl::batch_normalization_forward::desc fd(prop_kind::forward_training, md, kEps, flags);
  dnnl::batch_normalization_forward::primitive_desc fpd(fd, eng);
  dnnl::primitive fwd = dnnl::batch_normalization_forward(fpd);
  memory workspace;
  std::unordered_map<int, memory> fwd_args = {{DNNL_ARG_SRC, src},     {DNNL_ARG_DST, dst},
                                              {DNNL_ARG_MEAN, mean},   {DNNL_ARG_VARIANCE, var},
                                              {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift}};
  if (o.relu) {
    workspace = memory(fpd.workspace_desc(), eng);
    fwd_args.insert({DNNL_ARG_WORKSPACE, workspace});
  }
  if (o.kind == op_kind::fwd_training) {
    measure(state, o.kind, p, execute(fwd, fwd_args));
    return;
  }

  // Backward: statistics and ReLU workspace from one real forward pass.
  fwd.execute(strm, fwd_args);
  strm.wait();
  dnnl::batch_normalization_backward::desc bd(prop_kind::backward, md, md, kEps, flags);
  dnnl::batch_normalization_backward::primitive_desc bpd(bd, eng, fpd);
  dnnl::primitive bwd = dnnl::batch_normalization_backward(bpd);
  // dx goes to the y buffer, as in bnorm's rows.
  std::unordered_map<int, memory> bwd_args = {{DNNL_ARG_SRC, src},
                                              {DNNL_ARG_MEAN, mean},
                                              {DNNL_ARG_VARIANCE, var},
                                              {DNNL_ARG_DIFF_DST, diff_dst},
                                              {DNNL_ARG_SCALE, scale},
                                              {DNNL_ARG_SHIFT, shift},  // required by 2.6
                                              {DNNL_ARG_DIFF_SRC, dst},
                                              {DNNL_ARG_DIFF_SCALE, diff_scale},
                                              {DNNL_ARG_DIFF_SHIFT, diff_shift}};
  if (o.relu) bwd_args.insert({DNNL_ARG_WORKSPACE, workspace});
  measure(state, o.kind, p, execute(bwd, bwd_args));
}

void run_onednn(benchmark::State& state, const op& o, layout l, const problem& p) {
  try {
    run_onednn_row(state, o, l, p);
  } catch (const dnnl::error& e) {
    state.SkipWithError(e.what());
  }
}

}  // namespace

implementation onednn_implementation() { return {"onednn", true, run_onednn}; }

std::string onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
         std::to_string(v->patch) + (v->cpu_runtime == DNNL_RUNTIME_OMP ? " (OpenMP)" : "");
}

}  // namespace bnorm_bench
