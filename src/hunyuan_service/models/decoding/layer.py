"""One decoder layer of the continuous decoder's step, in as few kernels as its math allows.

The step is captured as a CUDA graph (graphs.py), and at batch 1 each kernel inside it costs a
start-up and a tail on top of the bytes it reads; the model's own modules launch 44 per layer
(attention given a boolean mask included). This layer computes the same thing in 19
(`bench/step_kernels.py` counts them):

- the query, key and value projections are one matrix product, and so are the MLP's gate and
  up projections: `join_projections` joins each layer's weights once at load, and the model's
  own modules keep working on views into the joined weights, so no memory is added;
- the queries and keys are rotated in one pass that leaves the values as they are, with the
  rotation's signs folded into its sine (`rotation`) and every position's rotation computed
  once at load (`Rotations`), so the keys and values come out of it side by side and go into
  the KV pool, which holds them side by side too, with one write, and come back for attention
  with one gather;
- the RMS norms use torch's RMS normalisation (one fused kernel on CUDA), which computes in
  float32 and rounds to the model's dtype once, then the weight, as the model's own norm does;
- attention takes an additive mask built once per step (`attention_mask`), where a boolean
  one costs two kernels in every layer on CUDA.

A layer whose weights are quantized (QUANTIZE: tensor subclasses that cannot be joined) keeps
its separate projections; the rest of the layer is the same.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Joined(NamedTuple):
    """A layer's joined projection weights, [out, in] each; biases are None where it has none."""

    qkv: Any
    qkv_bias: Any
    gate_up: Any
    gate_up_bias: Any


def join_projections(layer: Any) -> Joined | None:
    """Joins `layer`'s q, k and v projections, and its gate and up projections, into one weight
    each, and points the modules' weights (and biases) at views of them. None, changing
    nothing, where a weight is not a plain tensor (quantized)."""
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    attention, mlp = layer.self_attn, layer.mlp
    groups = [
        [attention.q_proj, attention.k_proj, attention.v_proj],
        [mlp.gate_proj, mlp.up_proj],
    ]
    modules = [module for group in groups for module in group]
    if any(is_traceable_wrapper_subclass(module.weight.data) for module in modules):
        return None
    joined: list[Any] = []
    with torch.no_grad():
        for group in groups:
            for name in ("weight", "bias"):
                parts = [getattr(module, name) for module in group]
                if parts[0] is None:
                    joined.append(None)
                    continue
                whole = torch.cat([part.data for part in parts])
                start = 0
                for module, part in zip(group, parts, strict=True):
                    view = whole[start : start + part.shape[0]]
                    setattr(module, name, torch.nn.Parameter(view, requires_grad=False))
                    start += part.shape[0]
                joined.append(whole)
    return Joined(*joined)


def rms_norm(norm: Any, hidden: Any) -> Any:
    """The model's RMSNorm `norm(hidden)`: normalised in float32 and cast back in one kernel
    (torch's RMS normalisation computes in float32 for bfloat16 and float16 inputs), then
    weighted."""
    from torch.nn.functional import rms_norm as normalise

    return norm.weight * normalise(hidden, (hidden.shape[-1],), eps=norm.variance_epsilon)


def rotation(cos: Any, sin: Any, heads: int, kv_heads: int) -> tuple[Any, Any]:
    """The model's rotary `cos` and `sin` [rows, 1, head_dim] as `decoder_layer` takes them,
    [rows, groups, 1, head_dim] each, for the projections viewed as groups of `kv_heads` heads
    (the queries' groups, then the keys', then the values'): `sin` with its first half negated
    (`turn`), so that the rotation needs no negation of its own (the same values: only signs
    move), for the queries and keys; cos 1 and turn 0 for the values, which the rotation then
    leaves as they are (v * 1 + w * 0 == v), so that keys and values come out of it side by
    side."""
    import torch

    rows, _, head_dim = cos.shape
    half = head_dim // 2
    turn = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    rotated = (rows, heads // kv_heads + 1, head_dim)
    cos = torch.cat((cos.expand(rotated), cos.new_ones(rows, 1, head_dim)), dim=1)
    turn = torch.cat((turn.expand(rotated), turn.new_zeros(rows, 1, head_dim)), dim=1)
    return cos[:, :, None], turn[:, :, None]


class Rotations:
    """Every rotary position's rotation for `decoder_layer`, computed once at load by the
    model's own rotary embedding and `rotation`: a step gathers its rows' (two kernels) instead
    of computing them (about twenty). At decode a token's three M-RoPE positions are equal, so
    one position number gives its rotation.

    Args:
        text_model: the text model (its `rotary_emb` and config).
        positions: how many positions (0 to positions - 1) a row may take.
    """

    def __init__(self, text_model: Any, positions: int) -> None:
        import torch

        config = text_model.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.positions = positions
        device, dtype = text_model.embed_tokens.weight.device, text_model.embed_tokens.weight.dtype
        probe = torch.empty(1, device=device, dtype=dtype)
        head_dim = config.hidden_size // heads
        # [positions + 1, 2 (cos, turn), head_dim]; the last row (1, 0) leaves a head as it is.
        self.table = torch.empty(positions + 1, 2, head_dim, device=device, dtype=dtype)
        with torch.inference_mode():
            for begin in range(0, positions, 8192):
                at = torch.arange(begin, min(positions, begin + 8192), device=device)
                cos, sin = text_model.rotary_emb(probe, at.view(1, -1, 1).expand(3, -1, 1))
                cos, turn = rotation(cos, sin, heads, kv_heads)
                self.table[begin : begin + at.shape[0], 0] = cos[:, 0, 0]
                self.table[begin : begin + at.shape[0], 1] = turn[:, 0, 0]
            self.table[positions, 0], self.table[positions, 1] = 1, 0
        # The group of heads each rotation is for: the queries' and keys' take the row's
        # position, the values' the last row.
        groups = heads // kv_heads + 2
        self.values_group = torch.arange(groups, device=device) == groups - 1

    def __call__(self, rotary: Any) -> tuple[Any, Any]:
        """Each row's (cos, turn) [rows, groups, 1, head_dim], as `rotation` gives them, for
        its position in `rotary` [rows]."""
        import torch

        at = torch.where(self.values_group, self.positions, rotary[:, None])
        both = self.table[at]  # [rows, groups, 2, head_dim]
        return both[:, :, 0:1], both[:, :, 1:2]


def attention_mask(valid: Any, dtype: Any) -> Any:
    """`valid` [rows, width] (where each row may attend) as the additive mask that attention
    takes, [rows, 1, 1, width] in `dtype`: 0 where valid, -inf elsewhere. Built once a step:
    given a boolean mask, PyTorch's attention builds this itself on CUDA, in every layer."""
    import torch

    mask = torch.full(valid.shape, float("-inf"), dtype=dtype, device=valid.device)
    return mask.masked_fill_(valid, 0.0)[:, None, None, :]


def decoder_layer(
    layer: Any,
    joined: Joined | None,
    pool: Any,
    hidden: Any,
    cos: Any,
    turn: Any,
    at: Any,
    index: Any,
    mask: Any,
) -> Any:
    """One decoder layer of the decode step: `hidden` [rows, 1, hidden] attends to each row's
    range of the layer's KV pool (`pool` [2 (keys, values), kv_heads, positions, head_dim]),
    after its own key and value are written at `at` [rows]; `index` [rows, width] picks each
    row's positions, `mask` [rows, 1, 1, width] those inside its length (`attention_mask`);
    `cos` and `turn` [rows, groups, 1, head_dim] are each row's rotation (`rotation`,
    `Rotations`). `joined`: the layer's joined projections, or None.

    A plain function of its layer and tensors, so one compilation serves every layer."""
    import torch
    from torch.nn.functional import linear, scaled_dot_product_attention

    count = hidden.shape[0]
    attention, mlp = layer.self_attn, layer.mlp
    head_dim = attention.head_dim
    kv_heads = attention.config.num_key_value_heads
    x = rms_norm(layer.input_layernorm, hidden)
    if joined is None:
        projections = (attention.q_proj(x), attention.k_proj(x), attention.v_proj(x))
        qkv = torch.cat(projections, dim=-1)
    else:
        qkv = linear(x, joined.qkv, joined.qkv_bias)
    qkv = qkv.view(count, -1, kv_heads, head_dim)  # groups of kv_heads heads
    # The queries and keys rotated, the values passed through, in one go: x * cos +
    # rotate_half(x) * sin, where rotate_half(x) * sin is the halves of x swapped, times `turn`.
    half = head_dim // 2
    turned = qkv * cos + torch.cat((qkv[..., half:], qkv[..., :half]), dim=-1) * turn
    query = turned[:, :-2]
    pool[:, :, at] = turned[:, -2:].permute(1, 2, 0, 3)
    ranges = pool[:, :, index]  # [2, kv_heads, rows, width, head_dim]
    row_keys, row_values = ranges[0].transpose(0, 1), ranges[1].transpose(0, 1)
    # The query heads of one KV head stand in for query positions: grouped-query attention
    # with any attention kernel, the KV heads never repeated.
    grouped = query.reshape(count, kv_heads, -1, head_dim)
    out = scaled_dot_product_attention(
        grouped, row_keys, row_values, attn_mask=mask, scale=attention.scaling
    )
    hidden = hidden + attention.o_proj(out.reshape(count, 1, -1))
    x = rms_norm(layer.post_attention_layernorm, hidden)
    if joined is None:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    else:
        gate, up = linear(x, joined.gate_up, joined.gate_up_bias).chunk(2, dim=-1)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up)
