"""Qwen2.5-VL image-to-text through transformers and qwen-vl-utils."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from hunyuan_service.errors import InvalidInput, JobCancelled, ModelLoadError
from hunyuan_service.models.base import JobContext, TorchModel
from hunyuan_service.models.decode_ahead import ahead_of_the_device
from hunyuan_service.models.decoding.rows import TextStream, answer
from hunyuan_service.models.grammar import GrammarMask, sampling_after
from hunyuan_service.models.loading import (
    quiet_hf_progress,
    reporting_download,
    resolve_checkpoint,
)
from hunyuan_service.models.speed import speed_up_qwen
from hunyuan_service.models.types import (
    ChatMessage,
    Image2TextInput,
    Image2TextOutput,
    OutputGrammar,
    PixelRange,
)

if TYPE_CHECKING:
    from hunyuan_service.models.vision import VisionPlan


class QwenVLModel(TorchModel[Image2TextInput, Image2TextOutput]):
    """Qwen2.5-VL on one device; a stopping criterion makes generation cancellable per token."""

    model_type = "image2text"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.model: Any = None
        self.processor: Any = None
        self.grammar_tokenizer: Any = None  # llguidance's view of the vocabulary
        self.decoder: Any = None  # the continuous decoder, with MAX_BATCH_SIZE above 1
        self.images: Any = None  # an ImageEncoder: plans, with images encoded once and kept

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
        with reporting_download(source, self.report):
            model: Any = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                source, dtype=dtype, attn_implementation=attention, device_map=self.device
            )
            processor = AutoProcessor.from_pretrained(source)
        self.adopt(model, processor)

    def adopt(self, model: Any, processor: Any) -> None:
        """Serves `model` and `processor` with the configured speed options.

        `load` calls it after `from_pretrained`; the GPU benchmark calls it with a model it
        built in place, so both measure the same serving code.
        """
        if self.info.device == "unloaded":
            self.place()
        if model.device.type != self.device:  # `load` already placed it with device_map
            model = model.to(self.device)
        self.model = model.eval()
        self.processor = processor
        # Batched rows are left-padded, so every row's next token follows its own last one.
        self.processor.tokenizer.padding_side = "left"
        self.grammar_tokenizer = _grammar_tokenizer(self.model, self.processor.tokenizer)
        from hunyuan_service.models.vision import ImageEncoder

        self.images = ImageEncoder(
            self.model, self.processor, self.settings.vision_cache_bytes, _resize
        )
        speed = speed_up_qwen(self.model, self.settings, self.device)
        if self.settings.max_batch_size > 1 and self.settings.continuous_batching:
            from hunyuan_service.models.decoding.batch import DecodeBatch

            # Built at load, so that its KV pool is taken before the service turns ready.
            self.decoder = DecodeBatch(
                self.model,
                self.processor.tokenizer,
                self._checked_plan,
                self._row_grammar,
                capacity=kv_cache_tokens(self.settings),
                chunk_tokens=self.settings.prefill_chunk_tokens,
                ahead=self.settings.decode_ahead,
            )
            speed["kv_cache_tokens"] = self.decoder.pool.capacity
            graphs = self.settings.cuda_graphs and self.model.device.type == "cuda"
            compiled = self.settings.compile == "full"
            if graphs or compiled:
                self.decoder.pad_steps(
                    self.settings.max_batch_size, capture=graphs, compiled=compiled
                )
            step = "compiled" if compiled else "eager"
            if graphs:
                step += f", {len(self.decoder.padded.graphs)} CUDA graphs"
            speed["decode_step"] = step
        self.info.extra = {
            "attn_implementation": self.settings.attn_implementation,
            "vl_max_pixels": self._max_pixels,
            "tool_call_tokens": _has_tag_tokens(self.processor.tokenizer),
            **speed,
        }

    def warm_up(self) -> None:
        """Answers a short question about one image of each WARMUP size, and one without."""
        from PIL import Image

        sizes: list[tuple[int, int] | None] = [*self.settings.warmup_sizes, None]
        for size in sizes:
            images = () if size is None else (Image.new("RGB", size, "gray"),)
            message = ChatMessage(role="user", text="Describe this.", images=images)
            self.infer(Image2TextInput(messages=(message,), max_new_tokens=4), JobContext())

    @property
    def _max_pixels(self) -> int:
        """VL_MAX_PIXELS, within the image processor's own cap (12,845,056 for Qwen2.5-VL's,
        200,704 for the tiny demo's), which it would otherwise apply with a second resize."""
        cap = self.processor.image_processor.size.get("longest_edge")
        return min(int(self.settings.vl_max_pixels), int(cap or self.settings.vl_max_pixels))

    def infer(self, request: Image2TextInput, ctx: JobContext) -> Image2TextOutput:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        ctx.raise_if_stopped()
        plan = self._checked_plan(request)
        inputs, prompt_tokens = plan.inputs(ctx.raise_if_stopped), plan.tokens

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full(
                    (input_ids.shape[0],),
                    ctx.should_stop(),
                    dtype=torch.bool,
                    device=input_ids.device,
                )

        generate_kwargs = self._sampling_with_grammars(request, [request.grammar])
        generate_kwargs.update(
            max_new_tokens=request.max_new_tokens,
            stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]),
            streamer=TextStream(self.processor.tokenizer, ctx),
        )
        if request.stop:
            generate_kwargs.update(
                stop_strings=list(request.stop), tokenizer=self.processor.tokenizer
            )
        with torch.inference_mode(), ahead_of_the_device(self.settings.decode_ahead):
            if request.seed is not None:
                # One job runs at a time, so seeding the global generator is race-free here.
                torch.manual_seed(request.seed)
            output = self.model.generate(**inputs, **generate_kwargs)
        ctx.raise_if_stopped()
        generated = output[0, prompt_tokens:]
        return answer(self._decode(generated), request, prompt_tokens, int(generated.shape[0]))

    def caches(self) -> dict[str, Any]:
        return {"vision": self.images.cache} if self.images is not None else {}

    def recover_from_oom(self) -> None:
        if self.images is not None:
            self.images.cache.clear()  # it holds device memory; refilled as images come
        super().recover_from_oom()

    # -- continuous batching (MAX_BATCH_SIZE > 1) ---------------------------------------------

    def decodes_continuously(self) -> bool:
        return self.decoder is not None

    def serve_continuously(self, feed: Any) -> None:
        """Decodes jobs together as they come and go (models/decoding/)."""
        import torch

        from hunyuan_service.models.decoding.serve import serve_rows

        with torch.inference_mode():
            serve_rows(self.decoder, feed, self.is_out_of_memory, self.recover_from_oom)

    def _row_grammar(self, grammar: OutputGrammar) -> GrammarMask:
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        return GrammarMask(self.grammar_tokenizer, [grammar], vocab)

    # -- batching ----------------------------------------------------------------------------

    supports_batching = True

    def batch_key(self, request: Image2TextInput) -> Hashable | None:
        """Greedy requests batch with greedy ones; sampled ones need equal sampling settings.

        A seeded sampled request runs alone: rows of a batch share one random stream, so its
        seed could not reproduce its tokens. So does a request with stop strings, which
        transformers applies to the whole batch.
        """
        if request.stop or (request.temperature > 0 and request.seed is not None):
            return None
        if request.temperature == 0:
            return ("greedy", request.repetition_penalty)
        return (
            "sampled",
            request.temperature,
            request.top_p,
            request.top_k,
            request.repetition_penalty,
        )

    def infer_batch(
        self, requests: list[Image2TextInput], contexts: list[JobContext]
    ) -> list[Image2TextOutput | BaseException]:
        """Decodes the rows together, left-padded; each row stops at its own limit or cancel."""
        import torch
        from transformers import StoppingCriteriaList

        def all_stopped() -> None:
            if all(ctx.should_stop() for ctx in contexts):
                raise JobCancelled("every row of the batch stopped")

        all_stopped()
        plan = self._plan(requests)  # nothing encoded yet: a row refused below never is
        lengths = [int(n) for n in plan.partial["attention_mask"].sum(dim=1).tolist()]
        too_long = [n > self.settings.max_input_tokens for n in lengths]
        if any(too_long):  # answer those rows with the refusal, and run the others alone
            kept = [i for i, over in enumerate(too_long) if not over]
            rest = (
                self.infer_batch([requests[i] for i in kept], [contexts[i] for i in kept])
                if kept
                else []
            )
            answers = iter(rest)
            return [
                self._too_many_tokens(n) if over else next(answers)
                for n, over in zip(lengths, too_long, strict=True)
            ]
        inputs = plan.inputs(all_stopped)  # checked before each encoder block
        width = plan.tokens
        limits = [request.max_new_tokens for request in requests]
        rows = _RowStops(contexts, limits, width)
        # Sampling settings are equal in a batch, by `batch_key`; grammars are per row.
        grammars = [request.grammar for request in requests]
        generate_kwargs = self._sampling_with_grammars(requests[0], grammars)
        generate_kwargs.update(
            max_new_tokens=max(limits),
            stopping_criteria=StoppingCriteriaList([rows]),
            streamer=_BatchStreamer(self.processor.tokenizer, contexts, rows),
        )
        with torch.inference_mode(), ahead_of_the_device(self.settings.decode_ahead):
            output = self.model.generate(**inputs, **generate_kwargs)
        all_stopped()
        eos = set(_as_list(self.model.generation_config.eos_token_id))
        results: list[Image2TextOutput | BaseException] = []
        for i, (request, ctx) in enumerate(zip(requests, contexts, strict=True)):
            if ctx.should_stop():
                results.append(JobCancelled(f"job stopped: {ctx.stop_reason()}"))
                continue
            generated = output[i, width:].tolist()
            recorded = rows.lengths[i]
            length = recorded if recorded is not None else len(generated)
            first_eos = next((n + 1 for n, t in enumerate(generated) if t in eos), length)
            generated = generated[: min(length, first_eos)]
            prompt_tokens = int(inputs["attention_mask"][i].sum())
            text = self._decode(torch.tensor(generated, dtype=torch.long))
            results.append(answer(text, request, prompt_tokens, len(generated)))
        return results

    # -- shared by both paths ----------------------------------------------------------------

    def _checked_plan(self, request: Image2TextInput) -> VisionPlan:
        """`_plan` for one request (alone, or joining the continuous decoder), refused with a
        422 where its templated prompt passes MAX_INPUT_TOKENS, before any image is encoded."""
        plan = self._plan([request])
        if plan.tokens > self.settings.max_input_tokens:
            raise self._too_many_tokens(plan.tokens)
        return plan

    def _too_many_tokens(self, tokens: int) -> InvalidInput:
        limit = self.settings.max_input_tokens
        return InvalidInput(
            f"messages: the input is {tokens} tokens once templated, images included; at most "
            f"{limit} are allowed (MAX_INPUT_TOKENS): send less text or fewer or smaller images",
            param="messages",
        )

    def _plan(self, requests: list[Image2TextInput]) -> VisionPlan:
        """The requests as rows, tokenized, their images and videos ready to encode: each
        image is encoded once and reused while the vision cache keeps it (models/vision.py)."""
        rows = []
        for request in requests:
            prompt, images = self._prompt(request)
            videos = [video for message in request.messages for video in message.videos]
            self._check_video_tokens(videos)
            bounds = [
                tuple(sorted(self._pixel_bounds(request, message.pixels(i)).items()))
                for message in request.messages
                for i in range(len(message.images))
            ]
            rows.append((prompt, images, videos, bounds))
        return self.images.plan(rows)

    def _prompt(self, request: Image2TextInput) -> tuple[str, list[Any]]:
        """The templated prompt, one marker per image and video, and the images as sent."""
        conversation, images = [], []
        for message in request.messages:
            parts: list[dict[str, Any]] = []
            for image in message.images:
                images.append(image)
                parts.append({"type": "image"})
            parts += [{"type": "video"} for _ in message.videos]
            parts.append({"type": "text", "text": message.text})
            conversation.append({"role": message.role, "content": parts})
        prompt = self.processor.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        return prompt, images

    def _check_video_tokens(self, videos: list[Any]) -> None:
        from hunyuan_service.videos import video_tokens

        tokens = sum(video_tokens(video) for video in videos)
        limit = self.settings.max_video_tokens
        if tokens > limit:
            raise InvalidInput(
                f"videos: {len(videos)} videos make {tokens} visual tokens; at most {limit} are "
                "allowed (MAX_VIDEO_TOKENS): ask for a lower fps, fewer max_frames or a smaller "
                "max_pixels",
                param="videos",
            )

    def prepare_image(self, image: Any, pixels: PixelRange, param: str) -> Any:
        """qwen_vl_utils' resize of a decoded image to its bounds, on the CPU pool as it is
        decoded: on the model thread it held up every running row (16-19 ms a megapixel image
        on the development machine, bench/intake.py). The model thread then finds the image
        sized and leaves it (`_resize`), so the encoder sees the pixels it did before; the
        vision cache keys it by the image it was made from, as before.

        A 422 where the resized image is one the model cannot take: rounding each side to a
        multiple of 28 can take an image at the ratio the API allows (6000x30) just past what
        Qwen's image processor takes (5992x28, over 200:1), and a small `max_pixels` can round
        a long, thin image's shorter side down to 0 (qwen_vl_utils then fails to resize).
        """
        from qwen_vl_utils.vision_process import MAX_RATIO, SPATIAL_MERGE_SIZE, smart_resize

        from hunyuan_service.media import with_digest_of

        bounds = self._pixel_bounds(None, pixels)
        factor = 14 * SPATIAL_MERGE_SIZE  # as `_resize`
        height, width = smart_resize(image.height, image.width, factor, **bounds)
        if min(width, height) < factor or max(width, height) > MAX_RATIO * min(width, height):
            raise InvalidInput(
                f"{param}: image is {image.width}x{image.height} pixels, {width}x{height} once "
                f"resized to the model's multiples of {factor} within max_pixels "
                f"{bounds['max_pixels']}; the model takes sides of at least {factor} pixels, at "
                f"most {MAX_RATIO} times each other: crop or pad it, or raise max_pixels",
                param=param,
            )
        return with_digest_of(_resize(image, bounds), image)

    def _pixel_bounds(
        self, request: Image2TextInput | None, own: PixelRange = (None, None)
    ) -> dict[str, int]:
        """qwen_vl_utils' resize bounds for one image: its own, else the request's, within the
        server's (the API checked them); where min_pixels is over max_pixels, max_pixels wins."""
        low, high = own
        if request is not None:
            low, high = low or request.min_pixels, high or request.max_pixels
        bounds = {"max_pixels": min(high or self._max_pixels, self._max_pixels)}
        if low is not None:
            bounds["min_pixels"] = min(low, bounds["max_pixels"])
        return bounds

    def _sampling_with_grammars(
        self, request: Image2TextInput, grammars: list[OutputGrammar | None]
    ) -> dict[str, Any]:
        """`generate` kwargs for `request`'s sampling, with each row held to its grammar."""
        sampling = self._sampling(request)
        if all(grammar is None for grammar in grammars):
            return sampling
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        mask = GrammarMask(self.grammar_tokenizer, grammars, vocab)
        return sampling_after(mask, sampling, self.model.generation_config)

    @staticmethod
    def _sampling(request: Image2TextInput) -> dict[str, Any]:
        sampling = request.temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sampling}
        if sampling:
            kwargs["temperature"] = request.temperature
            if request.top_p is not None:
                kwargs["top_p"] = request.top_p
            if request.top_k is not None:
                kwargs["top_k"] = request.top_k
        else:
            # Greedy: the checkpoint's own sampling defaults would only trigger warnings.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if request.repetition_penalty is not None:
            kwargs["repetition_penalty"] = request.repetition_penalty
        return kwargs

    def _decode(self, token_ids: Any) -> str:
        return str(
            self.processor.batch_decode(
                [token_ids], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )[0]
        )


def _resize(image: Any, bounds: dict[str, int]) -> Any:
    """qwen_vl_utils' resize to the pixel bounds. Only decoded PIL images reach it: its own
    fetcher would follow any URL or open any path. An RGB image already at the size it would
    get (one that `prepare_image` sized) is returned as it is: `fetch_image` would copy it
    through an RGB conversion and a resize to its own size, which change no pixel."""
    from qwen_vl_utils import fetch_image
    from qwen_vl_utils.vision_process import IMAGE_MIN_TOKEN_NUM, SPATIAL_MERGE_SIZE

    factor = 14 * SPATIAL_MERGE_SIZE  # fetch_image's patch factor for its default patch size
    low = bounds.get("min_pixels", IMAGE_MIN_TOKEN_NUM * factor**2)
    width, height = image.size
    # What smart_resize leaves as it is; asking it instead would apply its aspect-ratio check
    # to the resized image, whose rounding can take a ratio of 200 (allowed) just past it.
    if (
        image.mode == "RGB"
        and width % factor == 0
        and height % factor == 0
        and low <= width * height <= bounds["max_pixels"]
    ):
        return image
    return fetch_image({"image": image, **bounds})


def kv_cache_tokens(settings: Any) -> int:
    """KV_CACHE_TOKENS, or by default room for MAX_BATCH_SIZE rows of 4096 positions, and at
    least for one request of the largest size allowed."""
    if settings.kv_cache_tokens:
        return int(settings.kv_cache_tokens)
    largest = settings.max_input_tokens + settings.max_new_tokens_limit
    return max(settings.max_batch_size * 4096, largest)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]


class _RowStops:
    """A stopping criterion with one answer per row: its own token limit, or its job stopped.

    `lengths[i]` records how many tokens row i had generated when it first stopped this way.
    """

    def __init__(self, contexts: list[JobContext], limits: list[int], prompt_width: int) -> None:
        self.contexts, self.limits, self.width = contexts, limits, prompt_width
        self.lengths: list[int | None] = [None] * len(limits)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        produced = int(input_ids.shape[1]) - self.width
        for i, (ctx, limit) in enumerate(zip(self.contexts, self.limits, strict=True)):
            if self.lengths[i] is None and (produced >= limit or ctx.should_stop()):
                self.lengths[i] = min(produced, limit)
        done = torch.tensor([length is not None for length in self.lengths], dtype=torch.bool)
        # Not `torch.tensor(..., device=cuda)`: that copy waits for the device every step.
        return done.to(input_ids.device, non_blocking=True)


class _BatchStreamer:
    """Splits each step's tokens by row and emits every row's new text to its own job."""

    def __init__(self, tokenizer: Any, contexts: list[JobContext], rows: _RowStops) -> None:
        self.rows = rows
        self.streams = [TextStream(tokenizer, ctx) for ctx in contexts]
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate first hands over the whole (padded) prompt
            self.prompt_seen = True
            return
        tokens = value.reshape(len(self.streams), -1)
        for i, stream in enumerate(self.streams):
            # A row past its own end only gets padding. The criterion may already have recorded
            # this step's length, so compare counts rather than ask whether it stopped.
            end = self.rows.lengths[i]
            if len(stream.tokens) < (end if end is not None else self.rows.limits[i]):
                stream.prompt_seen = True
                stream.put(tokens[i])

    def end(self) -> None:
        for stream in self.streams:
            stream.end()


def _has_tag_tokens(tokenizer: Any) -> bool:
    """Whether the vocabulary has `<tool_call>` and `</tool_call>` as tokens that decoding keeps
    (added, not special), as Qwen2.5's has; the tiny demo's spells them out."""
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    tags = [added.get(tag) for tag in ("<tool_call>", "</tool_call>")]
    return all(tag is not None and not tag.special for tag in tags)


def _grammar_tokenizer(model: Any, tokenizer: Any) -> Any:
    """llguidance's tokenizer for structured output, built once (about 1 s for Qwen's vocab)."""
    import llguidance.hf

    eos = _as_list(model.generation_config.eos_token_id) or [tokenizer.eos_token_id]
    vocab = int(model.get_output_embeddings().weight.shape[0])
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)


def _has_flash_attention() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None
