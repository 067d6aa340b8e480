"""Builds tiny random-weight checkpoints of the real architectures, for demos and tests.

The checkpoints are saved with `save_pretrained` and loaded back by the same `from_pretrained`
code as real ones, so the whole serving path is exercised without a download. Their outputs are
noise: they prove the plumbing, not the model.
"""

from __future__ import annotations

import logging
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Bump when a builder changes, so stale caches are rebuilt rather than reused.
TINY_FORMAT_VERSION = 2  # 2: the chat template renders video parts
_CHARS = string.ascii_letters + string.digits + string.punctuation


def ensure_tiny_checkpoint(model_type: str, cache_dir: Path) -> Path:
    """Returns the folder of the tiny checkpoint for `model_type`, building it once if missing."""
    target = cache_dir / f"tiny-{model_type}-v{TINY_FORMAT_VERSION}"
    if (target / ".complete").exists():
        return target
    builders: dict[str, Callable[[Path], None]] = {
        "text2image": build_tiny_flux,
        "image2text": build_tiny_qwen_vl,
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a crash or a concurrent start never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        builders[model_type](staging)
        (staging / ".complete").write_text("ok\n")
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built tiny %s checkpoint at %s", model_type, target)
    return target


@dataclass(frozen=True)
class FluxShape:
    """The dimensions of a FLUX pipeline; the defaults are the tiny demo model."""

    layers: int = 1
    single_layers: int = 1
    heads: int = 2
    head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    guidance_embeds: bool = False
    t5: dict[str, Any] = field(
        default_factory=lambda: {
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 37,
            "num_layers": 1,
            "num_heads": 4,
        }
    )
    t5_vocab: int | None = None  # None: the tokenizer's own size
    clip: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        }
    )
    clip_vocab: int | None = None
    vae_channels: tuple[int, ...] = (8, 8, 8, 8)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 4


def build_tiny_flux(folder: Path, guidance_embeds: bool = False) -> None:
    """Saves a ~1 MB FluxPipeline (schnell-style unless `guidance_embeds`) into `folder`."""
    import torch

    torch.manual_seed(0)
    build_flux(FluxShape(guidance_embeds=guidance_embeds)).save_pretrained(folder)


def build_flux(shape: FluxShape) -> Any:
    """A FluxPipeline of the given shape with random weights, made on the default device."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _CHARS:
        clip_vocab.setdefault(char, len(clip_vocab))
        clip_vocab.setdefault(char + "</w>", len(clip_vocab))
    clip_tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=shape.clip_vocab or len(clip_vocab),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **shape.clip,
        )
    )
    t5_pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    t5_pieces += [(char, -2.0) for char in _CHARS] + [("\u2581" + c, -1.5) for c in _CHARS]
    t5_tokenizer = T5TokenizerFast(vocab=t5_pieces, model_max_length=512)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=shape.t5_vocab or len(t5_pieces), pad_token_id=0, eos_token_id=1, **shape.t5
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=shape.layers,
        num_single_layers=shape.single_layers,
        attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads,
        joint_attention_dim=shape.t5["d_model"],
        pooled_projection_dim=shape.clip["hidden_size"],
        guidance_embeds=shape.guidance_embeds,
        axes_dims_rope=shape.axes_dims_rope,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(shape.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(shape.vae_channels),
        block_out_channels=shape.vae_channels,
        layers_per_block=shape.vae_layers_per_block,
        latent_channels=16,
        norm_num_groups=shape.vae_norm_groups,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


# The Qwen2.5-VL conversation format, written for the tiny model: a default system turn, image
# and video parts as vision-start/pad/end markers, and an assistant header when a reply is wanted.
_QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
_QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def build_flux_lora(
    transformer: Any, target: Path, *, seed: int, rank: int = 4, alpha: float | None = None
) -> Path:
    """Saves a random rank-`rank` LoRA for `transformer`'s attention layers to `target` (a
    `.safetensors` file), the way a trainer would: peft layers, then diffusers' writer.

    Both LoRA matrices are random (a trained LoRA's are not zero), so the adapter changes every
    image; `transformer` itself is left as it was.
    """
    import copy

    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(transformer)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.add_adapter(config)
    layers = get_peft_model_state_dict(model)
    metadata = config.to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    FluxPipeline.save_lora_weights(
        target.parent,
        transformer_lora_layers=layers,
        weight_name=target.name,
        transformer_lora_adapter_metadata=metadata,
    )
    return target


def _byte_level_alphabet() -> list[str]:
    """The 256 characters that stand for raw bytes in a byte-level BPE vocabulary."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


@dataclass(frozen=True)
class QwenVLShape:
    """The dimensions of a Qwen2.5-VL model; the defaults are the tiny demo model."""

    hidden_size: int = 32
    layers: int = 1
    heads: int = 2
    kv_heads: int = 1
    intermediate_size: int = 37
    vocab_size: int | None = None  # None: the tokenizer's own size
    # Word-like tokens added after the 256 byte tokens, so that a benchmark's tokenizer is as
    # large as Qwen's (151,643 text tokens) where its size matters, as in constrained decoding.
    # Without merges, encoding still spells text byte by byte; decoding may emit them.
    word_tokens: int = 0
    tie_word_embeddings: bool = False
    image_max_pixels: int = 256 * 28 * 28  # the processor's own cap, before the service's
    vision: dict[str, Any] = field(
        default_factory=lambda: {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 2,
            "fullatt_block_indexes": [0],
        }
    )


def build_tiny_qwen_vl(
    folder: Path,
    *,
    hidden_size: int = 32,
    layers: int = 1,
    heads: int = 2,
    intermediate_size: int = 37,
) -> None:
    """Saves a ~0.5 MB Qwen2.5-VL model and processor into `folder`.

    Larger text dimensions give a random-weight model whose decoding costs real compute, for
    benchmarks (`bench/batching.py`); the defaults are the demo and test model.
    """
    import torch

    torch.manual_seed(0)
    shape = QwenVLShape(
        hidden_size=hidden_size, layers=layers, heads=heads, intermediate_size=intermediate_size
    )
    model, processor = build_qwen_vl(shape)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build_qwen_vl(shape: QwenVLShape, dtype: Any = None) -> tuple[Any, Any]:
    """A Qwen2.5-VL model of the given shape with random weights, made on the default device,
    and its processor (a byte-level tokenizer with Qwen's special tokens)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {char: index for index, char in enumerate(_byte_level_alphabet())}
    for word in _word_pieces(shape.word_tokens):
        vocab[word] = len(vocab)
    for token in _QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL_TOKENS[1:]})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIAL_TOKENS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=4 * 28 * 28,
            max_pixels=shape.image_max_pixels,
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=_QWEN_CHAT_TEMPLATE,
    )
    head_dim = shape.hidden_size // shape.heads
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": shape.vocab_size or len(tokenizer),
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "max_position_embeddings": 4096 if shape.vocab_size is None else 128_000,
            # The three M-RoPE sections must add up to head_dim / 2 (2, 3, 3 for head_dim 16).
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": _mrope_sections(head_dim),
                "rope_theta": 1e6,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            **({"tie_word_embeddings": True} if shape.tie_word_embeddings else {}),
        },
        vision_config={
            **shape.vision,
            "out_hidden_size": shape.hidden_size,  # must equal the text hidden size
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    if dtype is None:
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, processor


def _word_pieces(count: int) -> list[str]:
    """`count` distinct word-like pieces, the same on every machine: letters drawn by English
    frequency, half with the byte-level space marker, some capitalised, some digits."""
    import random

    rng = random.Random(0)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 6, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9]
    weights += [1.5, 1, 0.8, 0.2, 0.2, 0.1, 0.1]
    pieces: dict[str, None] = {}
    while len(pieces) < count:
        word = "".join(rng.choices(letters, weights, k=rng.randint(1, 10)))
        roll = rng.random()
        if roll < 0.1:
            word = word.capitalize()
        elif roll < 0.13:
            word = str(rng.randint(0, 999))
        if rng.random() < 0.5:
            word = "\u0120" + word  # 'Ġ': a leading space in byte-level BPE
        if len(word) > 1:
            pieces.setdefault(word)
    return list(pieces)


def _mrope_sections(head_dim: int) -> list[int]:
    """Temporal, height and width rotary sections in Qwen's 2:3:3 ratio, summing to head_dim/2."""
    half = head_dim // 2
    first = half // 4
    second = (half - first) // 2
    return [first, second, half - first - second]
