"""Qwen2.5-VL image-to-text through transformers and qwen-vl-utils."""

from __future__ import annotations

from typing import Any

from hunyuan_service.errors import ModelLoadError
from hunyuan_service.models.base import JobContext, TorchModel
from hunyuan_service.models.loading import quiet_hf_progress, resolve_checkpoint
from hunyuan_service.models.types import Image2TextInput, Image2TextOutput


class QwenVLModel(TorchModel[Image2TextInput, Image2TextOutput]):
    """Qwen2.5-VL on one device; a stopping criterion makes generation cancellable per token."""

    model_type = "image2text"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.model: Any = None
        self.processor: Any = None

    def load(self) -> None:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        quiet_hf_progress()
        dtype = self.place()
        attention = self.settings.attn_implementation
        if attention == "flash_attention_2" and not _has_flash_attention():
            raise ModelLoadError(
                "ATTN_IMPLEMENTATION=flash_attention_2 needs the flash-attn package; "
                "install it or use sdpa"
            )
        source = resolve_checkpoint(self.settings)
        model: Any = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source, dtype=dtype, attn_implementation=attention
        )
        self.model = model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(source)
        self.info.extra = {"attn_implementation": attention, "vl_max_pixels": self._max_pixels}

    @property
    def _max_pixels(self) -> int:
        return int(self.settings.vl_max_pixels)

    def infer(self, request: Image2TextInput, ctx: JobContext) -> Image2TextOutput:
        import torch
        from qwen_vl_utils import fetch_image
        from transformers import StoppingCriteria, StoppingCriteriaList

        ctx.raise_if_stopped()
        conversation, images = [], []
        for message in request.messages:
            parts: list[dict[str, Any]] = []
            for image in message.images:
                # Only decoded PIL images reach qwen_vl_utils: its own fetcher would follow any
                # URL or open any path. Here it only resizes to the pixel budget.
                images.append(fetch_image({"image": image, "max_pixels": self._max_pixels}))
                parts.append({"type": "image"})
            parts.append({"type": "text", "text": message.text})
            conversation.append({"role": message.role, "content": parts})
        prompt = self.processor.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        inputs = self.processor(
            text=[prompt], images=images or None, return_tensors="pt", padding=True
        ).to(self.device)
        prompt_tokens = int(inputs["input_ids"].shape[1])

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full(
                    (input_ids.shape[0],),
                    ctx.should_stop(),
                    dtype=torch.bool,
                    device=input_ids.device,
                )

        streamer = _DeltaStreamer(self.processor.tokenizer, ctx, prompt_tokens)
        sampling = request.temperature > 0
        generate_kwargs: dict[str, Any] = {
            "max_new_tokens": request.max_new_tokens,
            "do_sample": sampling,
            "stopping_criteria": StoppingCriteriaList([StopWhenCancelled()]),
            "streamer": streamer,
        }
        if sampling:
            generate_kwargs["temperature"] = request.temperature
            if request.top_p is not None:
                generate_kwargs["top_p"] = request.top_p
            if request.top_k is not None:
                generate_kwargs["top_k"] = request.top_k
        else:
            # Greedy: the checkpoint's own sampling defaults would only trigger warnings.
            generate_kwargs.update(temperature=None, top_p=None, top_k=None)
        if request.repetition_penalty is not None:
            generate_kwargs["repetition_penalty"] = request.repetition_penalty
        if request.stop:
            generate_kwargs.update(
                stop_strings=list(request.stop), tokenizer=self.processor.tokenizer
            )
        with torch.inference_mode():
            if request.seed is not None:
                # One job runs at a time, so seeding the global generator is race-free here.
                torch.manual_seed(request.seed)
            output = self.model.generate(**inputs, **generate_kwargs)
        ctx.raise_if_stopped()
        generated = output[0, prompt_tokens:]
        completion_tokens = int(generated.shape[0])
        text = self.processor.batch_decode(
            [generated], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )[0]
        for stop in request.stop:
            if stop in text:
                text = text[: text.index(stop)]
        finish = "length" if completion_tokens >= request.max_new_tokens else "stop"
        return Image2TextOutput(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish,
        )


class _DeltaStreamer:
    """A `generate` streamer that emits each new piece of decoded text as a `token` event.

    It runs on the worker thread inside `generate`, so no extra thread is needed. Text that ends in
    an incomplete UTF-8 sequence is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Any, ctx: JobContext, prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.tokens: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate first hands over the whole prompt
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.ctx.on_token(text[self.sent :])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.sent:
            self.ctx.on_token(text[self.sent :])
            self.sent = len(text)


def _has_flash_attention() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None
