// The decoder layers of a block-mode forward as one C++ loop: the same kernel calls, in the same order, as
// LlamaModel.forward's Python loop, so the same bits.
//
// Semantics (per layer l, over the step's token list; LoRA deltas only where the step has adapters):
//   h    = l == 0 ? rms_norm(x, input_norm[0]) : (the previous layer's last add_rms_norm)
//   qkv  = linear(h, W_qkv)      + lora(h, "qkv")
//   attn = attention(qkv, slots, positions, cos, sin, k_cache[l], v_cache[l])
//   h    = add_rms_norm(x, linear(attn, W_o) + lora(attn, "o"), post_norm[l])            x += o's output
//   act  = silu_mul(linear(h, W_gate_up) + lora(h, "gate_up"))
//   out  = linear(act, W_down) + lora(act, "down")
//   h    = add_rms_norm(x, out, input_norm[l + 1])   (the last layer: x += out)
// Shapes: x [tokens, hidden] fp32, updated in place and returned; slots, positions [tokens] int64;
// k_cache, v_cache [layers, slots, kv_heads, max_len, head_dim]; lora_slots [tokens] int64.
//
// Why: a layer is ~15 kernel calls, and each cost the Python loop a few microseconds of its own (attribute
// lookups, argument conversion, the cache views): 0.6-1.1 ms of a 6-11 ms batch-1 decode step on the 2-core
// Zen 3 (medians, interleaved: 6.5 -> 5.9 ms without adapters, 11.2 -> 10.1 ms with one; docs/performance.md).

#include <torch/extension.h>

#include <vector>

#include "layer_ops.h"

namespace {

// One block-quantized projection as BlockLinear holds it: pack()'s tensors, the output width, the format.
struct Projection {
  torch::Tensor words, sums, scales, minimums;
  int64_t n;
  bool q4;

  torch::Tensor operator()(const torch::Tensor& x) const {
    return npcd::block_linear(x, words, sums, scales, minimums, n, q4);
  }
};

struct Layer {
  torch::Tensor input_norm, post_norm;
  Projection qkv, o, gate_up, down;
};

// One layer's adapter stacks of one projection group (npcd.engine.lora.GroupStack).
struct GroupLora {
  torch::Tensor A, A_scale;
  std::vector<torch::Tensor> B, B_scale;
};

// The resident adapters' stacks of every layer, in the order qkv, o, gate_up, down; built once per change of
// the stacks (npcd.engine.lora.LoraStacks.generation), not per step.
class LoraSet {
 public:
  explicit LoraSet(std::vector<GroupLora> groups) : groups_(std::move(groups)) {}
  const GroupLora& at(int64_t layer, int64_t group) const { return groups_.at(layer * 4 + group); }
  int64_t layers() const { return static_cast<int64_t>(groups_.size()) / 4; }

 private:
  std::vector<GroupLora> groups_;
};

class Decoder {
 public:
  Decoder(std::vector<Layer> layers, double eps, int64_t heads, int64_t kv_heads, double attention_scale)
      : layers_(std::move(layers)), eps_(eps), heads_(heads), kv_heads_(kv_heads), scale_(attention_scale) {}

  torch::Tensor run(torch::Tensor x, const torch::Tensor& slots, const torch::Tensor& positions,
                    const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& k_cache,
                    const torch::Tensor& v_cache, const LoraSet* lora, const torch::Tensor& lora_slots) const {
    const int64_t n = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == n && v_cache.sizes() == k_cache.sizes(),
                "caches must be [layers, slots, kv_heads, max_len, head_dim] for ", n, " layers");
    TORCH_CHECK(lora == nullptr || lora->layers() == n, "the adapter stacks must cover all ", n, " layers");
    auto add = [&](const torch::Tensor& in, torch::Tensor& out, int64_t layer, int64_t group) {
      if (lora == nullptr) return;
      const GroupLora& g = lora->at(layer, group);
      npcd::lora_add(in, out, g.A, g.B, lora_slots, g.A_scale, g.B_scale);
    };
    torch::Tensor h = npcd::rms_norm(x, layers_[0].input_norm, eps_);
    for (int64_t l = 0; l < n; ++l) {
      const Layer& layer = layers_[l];
      torch::Tensor qkv = layer.qkv(h);
      add(h, qkv, l, 0);
      torch::Tensor k = k_cache.select(0, l), v = v_cache.select(0, l);
      torch::Tensor attn = npcd::attention(qkv, slots, positions, cos, sin, k, v, heads_, kv_heads_, scale_);
      torch::Tensor out = layer.o(attn);
      add(attn, out, l, 1);
      h = npcd::add_rms_norm(x, out, layer.post_norm, eps_);
      torch::Tensor gate_up = layer.gate_up(h);
      add(h, gate_up, l, 2);
      torch::Tensor act = npcd::silu_mul(gate_up);
      out = layer.down(act);
      add(act, out, l, 3);
      if (l + 1 < n)
        h = npcd::add_rms_norm(x, out, layers_[l + 1].input_norm, eps_);
      else
        x.add_(out);
    }
    return x;
  }

 private:
  std::vector<Layer> layers_;
  double eps_;
  int64_t heads_, kv_heads_;
  double scale_;
};

Projection projection(const pybind11::tuple& t) {
  TORCH_CHECK(t.size() == 6, "a projection is (words, sums, scales, minimums, n, q4)");
  return {t[0].cast<torch::Tensor>(), t[1].cast<torch::Tensor>(), t[2].cast<torch::Tensor>(),
          t[3].cast<torch::Tensor>(), t[4].cast<int64_t>(), t[5].cast<bool>()};
}

}  // namespace

void register_layers(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<LoraSet>(m, "LoraSet", "every layer's adapter stacks, in the group order qkv, o, gate_up, down")
      .def(py::init([](const std::vector<py::tuple>& groups) {
             std::vector<GroupLora> out;
             for (const auto& g : groups) {
               TORCH_CHECK(g.size() == 4, "a group's stacks are (A, Bs, A_scale, B_scales)");
               out.push_back({g[0].cast<torch::Tensor>(), g[2].cast<torch::Tensor>(),
                              g[1].cast<std::vector<torch::Tensor>>(), g[3].cast<std::vector<torch::Tensor>>()});
             }
             TORCH_CHECK(out.size() % 4 == 0, "4 groups per layer, got ", out.size());
             return LoraSet(std::move(out));
           }),
           py::arg("groups"));
  py::class_<Decoder>(m, "Decoder", "the decoder layers of a block-mode forward in one call (layers.cpp)")
      .def(py::init([](const std::vector<py::tuple>& layers, double eps, int64_t heads, int64_t kv_heads,
                       double scale) {
             std::vector<Layer> out;
             for (const auto& l : layers) {
               TORCH_CHECK(l.size() == 6, "a layer is (input_norm, post_norm, qkv, o, gate_up, down)");
               out.push_back({l[0].cast<torch::Tensor>(), l[1].cast<torch::Tensor>(),
                              projection(l[2].cast<py::tuple>()), projection(l[3].cast<py::tuple>()),
                              projection(l[4].cast<py::tuple>()), projection(l[5].cast<py::tuple>())});
             }
             TORCH_CHECK(!out.empty(), "a decoder needs at least one layer");
             return Decoder(std::move(out), eps, heads, kv_heads, scale);
           }),
           py::arg("layers"), py::arg("eps"), py::arg("heads"), py::arg("kv_heads"), py::arg("attention_scale"))
      .def("run", &Decoder::run, "x += every layer's output, in place; returns x", py::arg("x"), py::arg("slots"),
           py::arg("positions"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"),
           py::arg("lora").none(true), py::arg("lora_slots"));
}
