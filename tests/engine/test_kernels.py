"""npcd's CPU kernels against plain PyTorch references: the block-quantized linear and the fused decode glue."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from npcd.engine.kernels import load_cpu_kernels, machine_isa, why_unavailable
from npcd.engine.model import LlamaModel, RowBlock
from npcd.engine.ops import FusedOps, TorchOps
from npcd.engine.quant import BlockLinear, quantize_activations, quantize_q4_1, quantize_q8_0

pytestmark = pytest.mark.skipif(why_unavailable() is not None, reason=f"CPU kernels: {why_unavailable()}")

QUANTIZERS = {"q4_1": quantize_q4_1, "q8_0": quantize_q8_0}
# (N, K): the bundled model's four projection shapes, narrow ones, N not a multiple of the kernel's 4-row tile, and
# last groups of 1, 2, 3 and 15 blocks (the VNNI layout groups 16 blocks of 32)
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (48, 64), (7, 96), (5, 544), (9, 992)]


@pytest.fixture(scope="module")
def kernel():
    return load_cpu_kernels()



def activations(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, 3] *= 300.0  # an outlier channel, as the down projection's input has
    x[rows // 2] = 0.0  # an all-zero row (scale 0)
    return x


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("shape", SHAPES)
def test_block_linear_matches_the_dequantized_reference(build, kind, shape):
    n, k = shape
    weight = QUANTIZERS[kind](torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05)
    linear = BlockLinear(weight, build)
    for rows in (1, 2, 5, 21, 33):  # AMX: VNNI alone, a 5-row tile, a zero-padded tile, tiles + VNNI
        x = activations(rows, k, rows)
        expected = quantize_activations(x).double() @ weight.dequantize().double().T
        got = linear(x)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("k", [1536, 576])  # whole 16-block groups; a 2-block last group (VNNI layout)
def test_a_rows_result_does_not_depend_on_its_batch(build, kind, k):
    weight = QUANTIZERS[kind](torch.randn(576, k) * 0.05)
    linear = BlockLinear(weight, build)
    x = activations(32, k, 0)
    batched = linear(x)
    for i in range(32):
        assert torch.equal(linear(x[i:i + 1]), batched[i:i + 1])
        assert torch.equal(linear(x[max(0, i - 4):i + 1])[-1], batched[i])


def test_requantizing_the_bundled_model_recovers_its_weights(real_model_dir):
    """The bundled GGUF stores the projections in Q4_1 and the embedding in Q8_0: re-quantizing the
    dequantized cache is (near) lossless, so the block modes lose only the activations' rounding."""
    from safetensors import safe_open

    with safe_open(str(real_model_dir / "model.safetensors"), framework="pt") as st:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.17.mlp.down_proj.weight"):
            w = st.get_tensor(name)
            assert torch.equal(quantize_q4_1(w).dequantize(), w), name
        embed = st.get_tensor("model.embed_tokens.weight")[:4096]
    torch.testing.assert_close(quantize_q8_0(embed).dequantize(), embed, rtol=1e-6, atol=1e-7)


def test_block_kernel_refuses_bad_shapes_by_name(kernel):
    weight = quantize_q8_0(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="K must be a multiple of 32"):
        kernel.module.linear(torch.randn(1, 48), weight.q, torch.empty(0, dtype=torch.int32), weight.d, weight.m, 8, False)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        kernel.module.linear(torch.randn(1, 64).double(), weight.q, torch.empty(0, dtype=torch.int32), weight.d, weight.m, 8, False)


def test_fused_norms_and_silu_match_torch(kernel):
    torch.manual_seed(0)
    ref, fused = TorchOps(1e-5), FusedOps(1e-5, kernel)
    x, r, w = torch.randn(9, 576) * 3, torch.randn(9, 576), torch.rand(576) + 0.5
    torch.testing.assert_close(fused.rms_norm(x, w), ref.rms_norm(x, w))
    xa, xb = x.clone(), x.clone()
    torch.testing.assert_close(fused.add_rms_norm(xa, r, w), ref.add_rms_norm(xb, r, w))
    torch.testing.assert_close(xa, xb)  # both added the residual in place
    gate_up = torch.randn(9, 2 * 1536) * 4
    torch.testing.assert_close(fused.silu_mul(gate_up), ref.silu_mul(gate_up))


def test_fused_attention_matches_the_general_path(tiny_model_dir, kernel):
    """A mixed step (decode rows, then right-padded prompts) through both attention paths of the model:
    logits and the keys and values written to the cache agree."""
    from npcd.engine.model import StepInputs

    model = LlamaModel.load(tiny_model_dir, "fp32", torch.device("cpu"), 64)
    assert isinstance(model.ops, FusedOps)
    s = model.spec
    shape = (s.num_layers, 7, s.num_kv_heads, 64, s.head_dim)
    g = torch.Generator().manual_seed(1)
    k0, v0 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    decode = RowBlock(1, torch.tensor([[0], [5], [63]]), 64)   # one row at the cache's last position
    runner_block = RowBlock.for_prompts([[7, 8, 9, 10, 11], [12, 13]], [0, 30], 4)
    tokens = torch.tensor([3, 50, 700, 7, 8, 9, 10, 11, 12, 13])
    step = StepInputs(tokens=tokens, blocks=[decode, runner_block], last_index=torch.tensor([0, 1, 2, 7, 9]))
    results = []
    for ops in (model.ops, TorchOps(s.rms_norm_eps)):
        model.ops = ops
        k, v = k0.clone(), v0.clone()
        results.append((model.forward(step, k, v), k, v))
    (fused, kf, vf), (general, kg, vg) = results
    torch.testing.assert_close(fused, general, rtol=1e-4, atol=1e-4)
    written = [(1, 0), (2, 5), (3, 63)] + [(4, p) for p in range(5)] + [(5, 30), (5, 31)]
    for slot, pos in written:
        torch.testing.assert_close(kf[:, slot, :, pos], kg[:, slot, :, pos], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vf[:, slot, :, pos], vg[:, slot, :, pos], rtol=1e-5, atol=1e-5)
    assert torch.equal(kf[:, 0], k0[:, 0]) and torch.equal(kf[:, 6], k0[:, 6])  # other slots untouched
    assert torch.equal(kf[:, 5, :, :30], k0[:, 5, :, :30])  # a prompt continuing at 30 keeps its prefix


def test_fused_attention_refuses_a_token_outside_the_cache(kernel):
    qkv = torch.randn(1, (4 + 2 * 2) * 16)
    cache = torch.zeros(2, 2, 8, 16)
    table = torch.zeros(8, 16)
    args = (table, table, cache, cache.clone(), 4, 2, 0.25)
    with pytest.raises(RuntimeError, match="position 8 is outside the cache"):
        kernel.module.attention(qkv, torch.tensor([0]), torch.tensor([8]), *args)
    with pytest.raises(RuntimeError, match="slot 2 exceeds the cache's slots"):
        kernel.module.attention(qkv, torch.tensor([2]), torch.tensor([1]), *args)


def test_dense_reference_agrees_with_f_linear_for_fp32_mode():
    """fp32 mode keeps F.linear for projections: the comparison baseline of every PEFT test."""
    from npcd.engine.quant import WeightFactory

    w = torch.randn(16, 64)
    x = torch.randn(3, 64)
    assert torch.equal(WeightFactory("fp32", torch.device("cpu")).projection(w)(x), F.linear(x, w))


def test_a_stale_build_lock_is_cleared_and_a_live_one_kept(tmp_path):
    """A build killed midway leaves torch's lock file; without this every later start would wait on it forever."""
    import os
    import time

    from npcd.engine.kernels import BUILD_LOCK_STALE_S, _clear_stale_lock

    lock = tmp_path / "lock"
    lock.write_text("")
    _clear_stale_lock(lock)
    assert lock.exists()  # a build may be running right now
    old = time.time() - BUILD_LOCK_STALE_S - 1
    os.utime(lock, (old, old))
    _clear_stale_lock(lock)
    assert not lock.exists()
    _clear_stale_lock(lock)  # no lock: nothing to do


def test_the_engine_loads_the_widest_build_this_cpu_runs(kernel):
    # a narrower build only where a wider one failed or was refused, and then the startup log says why
    assert kernel.flags == machine_isa() or (kernel.skipped and all(kernel.skipped))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 32), (5, 1, 64), (4, 4, 64), (6, 3, 24)])
def test_fused_attention_by_kv_head_matches_softmax_and_each_token_alone(kernel, heads, kv_heads, head_dim):
    """The heads that share a kv head go through its keys together (tiles of 3, then 2 or 1): every head's
    output equals softmax attention over its slot, and a token's output is the same bits computed alone.
    Identity rotary (cos 1, sin 0), so the reference is plain attention over the cache the kernel wrote."""
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    slots, max_len = 3, 96
    k_cache = torch.randn(slots, kv_heads, max_len, head_dim, generator=g)
    v_cache = torch.randn(slots, kv_heads, max_len, head_dim, generator=g)
    cos, sin = torch.ones(max_len, head_dim), torch.zeros(max_len, head_dim)
    pos = torch.tensor([40, 41, 42, 43, 44, 0, 1, 2, 90, 7])  # a prompt chunk over 40 cached, a new prompt, decodes
    slot = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    qkv = torch.randn(len(pos), (heads + 2 * kv_heads) * head_dim, generator=g)
    scale = head_dim ** -0.5
    out = kernel.module.attention(qkv, slot, pos, cos, sin, k_cache, v_cache, heads, kv_heads, scale)
    group = heads // kv_heads
    for t, (p, s) in enumerate(zip(pos.tolist(), slot.tolist())):
        for h in range(heads):
            q = qkv[t, h * head_dim:(h + 1) * head_dim]
            keys, values = k_cache[s, h // group, :p + 1], v_cache[s, h // group, :p + 1]
            expected = torch.softmax(keys @ q * scale, dim=0) @ values
            torch.testing.assert_close(out[t, h * head_dim:(h + 1) * head_dim], expected, rtol=1e-5, atol=1e-5)
        alone = kernel.module.attention(qkv[t:t + 1].contiguous(), slot[t:t + 1], pos[t:t + 1], cos, sin,
                                        k_cache.clone(), v_cache.clone(), heads, kv_heads, scale)
        assert torch.equal(alone[0], out[t]), t
