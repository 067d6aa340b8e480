"""The continuous decoder's own decoder layer (models/decoding/layer.py): joined projections that
share the model's weights, the layer computing what the model's own modules compute (with its
projections joined or not), and quantized weights left alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hunyuan_service.models.base import JobContext
from hunyuan_service.models.types import ChatMessage, Image2TextInput
from tests.continuous_feed import run_together
from tests.e2e.conftest import tiny_settings


@pytest.fixture
def two_layers() -> Any:
    import torch

    from hunyuan_service.models.tiny import QwenVLShape, build_qwen_vl

    torch.manual_seed(3)
    model, _processor = build_qwen_vl(QwenVLShape(hidden_size=64, layers=2, heads=4, kv_heads=2))
    return model.eval()


def projections(layer: Any) -> list[Any]:
    attention, mlp = layer.self_attn, layer.mlp
    return [attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj]


def test_joining_adds_no_memory_and_changes_no_output_of_the_model(two_layers: Any) -> None:
    import torch

    from hunyuan_service.models.decoding.layer import join_projections

    text = two_layers.model.language_model
    tokens = torch.tensor([[3, 17, 250, 9, 44]])
    with torch.inference_mode():
        before = text(input_ids=tokens).last_hidden_state
    weights = {id(m): m.weight.clone() for layer in text.layers for m in projections(layer)}
    storages = {p.untyped_storage().data_ptr() for p in text.parameters()}
    joined = [join_projections(layer) for layer in text.layers]

    for layer, parts in zip(text.layers, joined, strict=True):
        assert parts is not None
        q, k, v, gate, up = projections(layer)
        # Each module's weight is a view into its layer's joined weight, in order.
        assert torch.equal(parts.qkv, torch.cat([q.weight, k.weight, v.weight]))
        assert torch.equal(parts.qkv_bias, torch.cat([q.bias, k.bias, v.bias]))
        assert torch.equal(parts.gate_up, torch.cat([gate.weight, up.weight]))
        assert parts.gate_up_bias is None  # Qwen's MLP has no biases
        for module in (q, k, v):
            assert module.weight.untyped_storage().data_ptr() == parts.qkv.data_ptr()
        for module in (gate, up):
            assert module.weight.untyped_storage().data_ptr() == parts.gate_up.data_ptr()
        for module in projections(layer):
            assert torch.equal(module.weight, weights[id(module)])
    # Per layer, the 8 tensors of q, k, v (weights and biases), gate and up became views of
    # 3 joined ones; the separate tensors are gone.
    after = {p.untyped_storage().data_ptr() for p in text.parameters()}
    assert len(after) == len(storages) - 5 * len(text.layers)
    with torch.inference_mode():
        assert torch.equal(text(input_ids=tokens).last_hidden_state, before)


def modules_layer(
    layer: Any,
    keys: Any,
    values: Any,
    hidden: Any,
    cos: Any,
    sin: Any,
    at: Any,
    index: Any,
    mask: Any,
) -> Any:
    """The same decode step's layer, written with the model's own modules and functions (its
    RMSNorm, `apply_rotary_pos_emb`, its MLP): the reference `decoder_layer` must match."""
    from torch.nn.functional import scaled_dot_product_attention
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    count, attention = hidden.shape[0], layer.self_attn
    head_dim = attention.head_dim
    x = layer.input_layernorm(hidden)
    query = attention.q_proj(x).view(count, 1, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(x).view(count, 1, -1, head_dim).transpose(1, 2)
    value = attention.v_proj(x).view(count, 1, -1, head_dim).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    keys[:, at] = key[:, :, 0].transpose(0, 1)
    values[:, at] = value[:, :, 0].transpose(0, 1)
    row_keys, row_values = keys[:, index].transpose(0, 1), values[:, index].transpose(0, 1)
    grouped = query.reshape(count, row_keys.shape[1], -1, head_dim)
    out = scaled_dot_product_attention(
        grouped, row_keys, row_values, attn_mask=mask, scale=attention.scaling
    )
    hidden = hidden + attention.o_proj(out.reshape(count, 1, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", "float32"),
        ("cpu", "bfloat16"),
        pytest.param("cuda", "bfloat16", marks=pytest.mark.gpu),
    ],
)
def test_the_layer_computes_what_the_models_own_modules_compute(
    two_layers: Any, device: str, dtype: str
) -> None:
    import torch

    from hunyuan_service.models.decoding.layer import (
        attention_mask,
        decoder_layer,
        join_projections,
        rotation,
    )

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = two_layers.to(device=device, dtype=getattr(torch, dtype))
    text = model.model.language_model
    layer = text.layers[0]
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 1, 64, generator=generator).to(device, model.dtype)
    positions = torch.tensor([6, 11, 2], device=device).view(1, 3, 1).expand(3, 3, 1)
    cos, sin = text.rotary_emb(hidden, positions)
    at = torch.tensor([4, 20, 33], device=device)
    index = torch.tensor(
        [[0, 1, 2, 3, 4, 4], [12, 13, 14, 20, 20, 20], [31, 32, 33, 33, 33, 33]], device=device
    )
    lengths = torch.tensor([5, 4, 3], device=device)
    mask = (torch.arange(6, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    pool = torch.randn(2, 2, 40, 16, generator=generator).to(device, model.dtype)
    # float32: rounding apart; bfloat16: a few units of its last place.
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == "float32" else {"rtol": 2e-2, "atol": 2e-2}
    with torch.inference_mode():
        expected_pool = pool.clone()
        keys, values = expected_pool[0], expected_pool[1]
        expected = modules_layer(layer, keys, values, hidden, cos, sin, at, index, mask)
        joined = join_projections(layer)
        assert joined is not None
        # The joined projections, and the separate ones a quantized layer keeps.
        for parts in (joined, None):
            got_pool = pool.clone()
            turns = rotation(cos, sin, heads=4, kv_heads=2)
            additive = attention_mask(mask[:, 0, 0], model.dtype)
            got = decoder_layer(layer, parts, got_pool, hidden, *turns, at, index, additive)
            torch.testing.assert_close(got, expected, **tolerance)
            torch.testing.assert_close(got_pool, expected_pool, **tolerance)
    assert not torch.equal(expected, hidden)
    # Each row's key and value went to its own position, and nowhere else.
    others = [position for position in range(40) if position not in at.tolist()]
    assert not torch.equal(expected_pool[:, :, at], pool[:, :, at])
    assert torch.equal(expected_pool[:, :, others], pool[:, :, others])


def test_the_rotation_table_holds_what_the_rotary_embedding_gives_each_position(
    two_layers: Any,
) -> None:
    import torch

    from hunyuan_service.models.decoding.layer import Rotations, rotation

    text = two_layers.model.language_model
    rotations = Rotations(text, 50)
    positions = torch.tensor([0, 7, 49, 7])
    cos, turn = rotations(positions)
    # Each row's rotation as the step computed it before the table: the model's rotary
    # embedding at the row's position (its three M-RoPE positions equal).
    probe = torch.empty(1)
    model_cos, model_sin = text.rotary_emb(probe, positions.view(1, 4, 1).expand(3, 4, 1))
    expected = rotation(model_cos, model_sin, heads=4, kv_heads=2)
    assert cos.shape == turn.shape == (4, 4, 1, 16)  # groups of 2 heads: 2 queries', keys', values'
    assert torch.equal(cos, expected[0])
    assert torch.equal(turn, expected[1])
    assert not torch.equal(cos[0], cos[1])
    # The values' group: cos 1 and turn 0, which leave a head as it is.
    assert torch.equal(cos[:, -1], torch.ones(4, 1, 16))
    assert torch.equal(turn[:, -1], torch.zeros(4, 1, 16))


def test_quantized_weights_stay_separate_and_rows_still_equal_their_solo_answers(
    tiny_cache: Path,
) -> None:
    from hunyuan_service.models.qwen_vl import QwenVLModel

    model = QwenVLModel(tiny_settings("image2text", tiny_cache, quantize="int8", max_batch_size=4))
    model.load()
    assert model.decoder.joined == [None] * len(model.decoder.text_model.layers)
    requests = {
        key: Image2TextInput((ChatMessage("user", text),), max_new_tokens=tokens)
        for key, text, tokens in (("a", "Hi", 6), ("b", "Tell me about the sea", 9))
    }
    together = run_together(model, requests).outcomes
    for key, request in requests.items():
        assert together[key] == model.infer(request, JobContext()), key
