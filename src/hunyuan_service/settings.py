"""The service's one settings object, read from environment variables and an optional .env file."""

from __future__ import annotations

import functools
import re
import textwrap
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ModelType = Literal["text2image", "image2text"]

DEFAULT_MODEL_IDS: dict[str, str] = {
    "text2image": "black-forest-labs/FLUX.1-schnell",
    "image2text": "Qwen/Qwen2.5-VL-3B-Instruct",
}
TINY_MODEL_ID = "tiny"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "hunyuan-service"


class Settings(BaseSettings):
    """Everything an operator can configure; a bad value stops start-up with a one-line message."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    model_type: ModelType = Field(
        "text2image", description="the model served: text2image (FLUX) or image2text (Qwen2.5-VL)"
    )
    model_id: str = Field(
        "",
        description="a hub id, a local folder, or `tiny` (the built-in demo)",
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = Field(
        "auto", description="where the model runs; auto picks cuda, then mps, then cpu"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="weights' dtype; auto: bf16 on CUDA where supported, fp16 on mps, fp32 on cpu",
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="image2text attention kernels (flash_attention_2 needs flash-attn)"
    )
    # Speed options (docs/performance.md). Only lossless ones may ever be on by default.
    compile: Literal["off", "regional", "full"] = Field(
        "off",
        description="torch.compile: regional (text2image blocks) or full (text2image "
        "transformer; image2text static cache and compiled decode step, and the continuous "
        "decoder's step, compiled at load)",
    )
    compile_mode: Literal[
        "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"
    ] = Field(
        "default",
        description="text2image: torch.compile's mode for COMPILE and COMPILE_VAE: "
        "max-autotune tries more matmul kernels at load; reduce-overhead and max-autotune also "
        "replay CUDA graphs",
    )
    compile_vae: bool = Field(
        False, description="text2image: compile the VAE decoder too (fullgraph, COMPILE_MODE)"
    )
    quantize: Literal["none", "fp8", "int8"] = Field(
        "none", description="torchao quantization: fp8 (CUDA, capability 8.9+) or int8; lossy"
    )
    attention_backend: str = Field(
        "native",
        pattern=r"^[a-z0-9_]+$",
        description="text2image: a diffusers attention backend (native, _native_cudnn, flash, ...)",
    )
    offload: Literal["none", "model", "sequential", "group"] = Field(
        "none", description="text2image: keep weights in CPU memory and move them when used"
    )
    fuse_qkv: bool = Field(False, description="text2image: fuse the attention projections")
    channels_last: bool = Field(False, description="text2image: channels-last VAE")
    step_cache_threshold: float = Field(
        0.0, ge=0, le=1, description="text2image: first-block cache; 0 is off (lossy above 0)"
    )
    prompt_cache_bytes: int = Field(
        64 * 2**20,
        ge=0,
        description="text2image: bytes of prompt embeddings kept on the device for prompts "
        "that repeat (least recently used out); 0: off",
    )
    vision_cache_bytes: int = Field(
        256 * 2**20,
        ge=0,
        description="image2text: bytes of vision-encoder outputs kept on the device for images "
        "that repeat, in a later request or a later turn (least recently used out); 0: off",
    )
    decode_ahead: bool = Field(
        False,
        description="image2text: queue each decode step before reading the last one's tokens "
        "(one job at a time, static batches and the continuous decoder)",
    )
    warmup: Annotated[list[str], NoDecode] = Field(
        [], description="sizes run before /ready, e.g. 1024x1024,768x1344"
    )

    # FLUX LoRA adapters that requests may choose by name (docs/loras.md): the *.safetensors
    # files of lora_dir, named by stem, and hub ones as name=org/repo[:weight_name].
    lora_dir: Path | None = Field(
        None, description="text2image: a folder of LoRA .safetensors files, named by stem"
    )
    loras: Annotated[list[str], NoDecode] = Field(
        [],
        description="text2image: hub adapters, name=org/repo[:file.safetensors], comma-separated",
    )
    max_loras_per_request: int = Field(
        3, ge=1, le=16, description="text2image: adapters one request may combine"
    )

    host: str = Field("0.0.0.0", description="the address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="the port to listen on")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="how much the log says"
    )

    # Admission and time limits. One job runs; at most max_queue_size wait behind it.
    max_queue_size: int = Field(
        8, ge=1, le=10_000, description="requests waiting behind the running one; more get a 503"
    )
    request_timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="seconds of queue wait plus run time before a 504"
    )
    shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        le=3_600,
        description="seconds after SIGTERM to finish admitted jobs; jobs still running then end "
        "with a 503",
    )
    stream_keepalive_s: float = Field(
        5.0, gt=0, le=300, description="seconds between keep-alive comments on an idle stream"
    )
    # Slow clients: the whole body must arrive within body_timeout_s (else 408), and at most
    # limit_concurrency connections and requests are served at once (uvicorn answers 503 above).
    body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="seconds a request body may take to arrive (else 408)"
    )
    limit_concurrency: int = Field(
        256,
        ge=8,
        le=100_000,
        description="requests served at once (503 above); also how many connections may wait "
        "for their headers at once",
    )
    header_timeout_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="seconds a connection has to send its request line and headers (else 408 "
        "and closed); 0 turns this guard off",
    )

    # Dynamic batching: up to max_batch_size compatible jobs from the head of the queue run
    # together; 1 keeps the one-job-at-a-time contract exactly.
    max_batch_size: int = Field(
        1, ge=1, le=64, description="jobs run together in one model call; 1 runs one at a time"
    )
    batch_wait_ms: float = Field(
        50.0, ge=0, le=1000, description="how long the worker may wait for batch companions"
    )
    continuous_batching: bool = Field(
        True,
        description="image2text with MAX_BATCH_SIZE above 1: requests join and leave the "
        "running decode at every token; false forms static batches at the head of the queue",
    )
    cuda_graphs: bool = Field(
        True,
        description="image2text, continuous batching, on CUDA: capture the decode step as CUDA "
        "graphs at load, one per bucket of rows and attention width; false runs it eagerly",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=0,
        le=1_000_000,
        description="image2text, continuous batching: prompt tokens run between two decode "
        "steps (part of one long prompt, or several short prompts together, padded), and about "
        "as much vision-encoder work, which bounds how long running rows wait; 0: each prompt "
        "and its images whole, any number together",
    )
    kv_cache_tokens: int = Field(
        0,
        ge=0,
        le=100_000_000,
        description="image2text with MAX_BATCH_SIZE above 1: KV cache positions shared by the "
        "rows decoding together; 0: MAX_BATCH_SIZE x 4096, and at least one request of "
        "MAX_INPUT_TOKENS + MAX_NEW_TOKENS_LIMIT",
    )

    # Input limits shared by both model types.
    max_prompt_chars: int = Field(4_000, ge=1, le=1_000_000, description="prompt length limit")
    max_body_bytes: int = Field(
        64 * 2**20, ge=1024, description="request body limit in bytes (413 above it)"
    )

    # text2image limits.
    min_image_side: int = Field(64, ge=16, description="text2image: smallest width or height")
    max_image_side: int = Field(
        2048, ge=16, le=8192, description="text2image: largest width or height"
    )
    max_inference_steps: int = Field(
        100, ge=1, le=1000, description="text2image: most denoising steps a request may ask for"
    )
    max_images_per_request: int = Field(
        4, ge=1, le=64, description="text2image: the most images (n) one request may ask for"
    )

    # image2text limits.
    max_new_tokens_limit: int = Field(
        2048, ge=1, description="image2text: the largest max_new_tokens a request may ask for"
    )
    # Tokens of the templated prompt, images included (1280 per image at the default
    # VL_MAX_PIXELS): bounds what a request's prefill may cost.
    max_input_tokens: int = Field(
        16_384,
        ge=256,
        le=1_000_000,
        description="image2text: tokens of the templated prompt, images included",
    )
    max_input_images: int = Field(8, ge=1, le=256, description="image2text: images per request")
    max_image_bytes: int = Field(
        20 * 2**20, ge=1024, description="image2text: bytes per image (413 above it)"
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1024, description="image2text: pixels per image, read from its header"
    )
    vl_max_pixels: int = Field(
        1280 * 28 * 28,
        ge=4 * 28 * 28,
        description="image2text: images are downscaled to at most this many pixels",
    )
    max_video_bytes: int = Field(
        32 * 2**20, ge=1024, description="image2text: bytes of one video file"
    )
    max_video_seconds: float = Field(
        120, gt=0, description="image2text: length of one video, read from its header"
    )
    max_video_decoded_frames: int = Field(
        3600,
        ge=2,
        description="image2text: frames decoded from one video to sample it (at 30 fps, two "
        "minutes); a video that needs more is refused",
    )
    max_video_frame_pixels: int = Field(
        3840 * 2160,
        ge=1024,
        description="image2text: pixels of one video frame, read from its header",
    )
    max_video_tokens: int = Field(
        8192,
        ge=4,
        description="image2text: visual tokens of the videos of one request, after sampling "
        "and resizing",
    )
    allowed_media_domains: Annotated[list[str], NoDecode] = Field(
        [], description="image2text: hosts whose http(s) image URLs may be fetched; empty: none"
    )
    allowed_local_media_dir: Path | None = Field(
        None, description="image2text: a folder whose files requests may name by path"
    )
    allow_private_media_addresses: bool = Field(
        False, description="image2text: let allowed hosts resolve to private addresses"
    )
    media_fetch_timeout_s: float = Field(
        10.0, gt=0, le=600, description="image2text: seconds one URL fetch may take in all"
    )

    # The async jobs API (/v1/jobs): retention of detached jobs and their results.
    job_result_ttl_s: float = Field(
        3600.0, gt=0, le=30 * 86_400, description="jobs API: seconds a finished job is kept"
    )
    max_stored_jobs: int = Field(256, ge=1, le=1_000_000, description="jobs API: jobs kept at most")
    job_store_max_bytes: int = Field(
        512 * 2**20, ge=0, description="jobs API: bytes of stored results kept at most"
    )

    # A jobs API shared by replicas: records, results, events and one queue on Redis.
    job_store_url: SecretStr | None = Field(
        None,
        description="jobs API: redis:// or rediss:// URL (password and database optional) of a "
        "store shared by replicas; unset: jobs live in this process's memory",
    )
    job_store_prefix: str = Field(
        "hunyuan:",
        min_length=1,
        max_length=64,
        description="jobs API: prefix of every Redis key, so deployments can share one Redis",
    )
    job_store_heartbeat_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="jobs API with JOB_STORE_URL: a replica's heartbeat; its jobs end "
        "`replica_lost` within 4 heartbeats of its death",
    )

    # Webhooks called when a jobs API job ends (Standard Webhooks signatures).
    webhook_secret: SecretStr | None = Field(
        None, description="jobs API: the Standard Webhooks secret (whsec_...); unset: no webhooks"
    )
    allowed_webhook_domains: Annotated[list[str], NoDecode] = Field(
        [], description="jobs API: hosts webhooks may call; empty: none"
    )
    allow_private_webhook_addresses: bool = Field(
        False, description="jobs API: let webhook hosts resolve to private addresses"
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=600, description="jobs API: seconds for one webhook POST"
    )
    webhook_max_attempts: int = Field(
        5, ge=1, le=20, description="jobs API: tries per webhook, with backoff between them"
    )

    api_key: SecretStr | None = Field(
        None, description="when set, every endpoint but /health and /ready needs this key"
    )
    # Host headers accepted (DNS rebinding); empty accepts any. Probes are exempt.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        [], description="Host header names accepted; empty: any"
    )
    playground: bool = Field(True, description="serve the playground page at GET /")
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="where the tiny demo models are built",
    )

    @field_validator(
        "allowed_media_domains", "allowed_webhook_domains", "allowed_hosts", mode="before"
    )
    @classmethod
    def _split_domains(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower().rstrip(".") for part in value.split(",") if part.strip()]
        return value

    @field_validator("warmup", mode="before")
    @classmethod
    def _split_sizes(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("warmup")
    @classmethod
    def _sizes_are_sizes(cls, value: list[str]) -> list[str]:
        for item in value:
            width, _, height = item.partition("x")
            if not (
                width.isdigit()
                and height.isdigit()
                and int(width) % 16 == 0 < int(width)
                and int(height) % 16 == 0 < int(height)
            ):
                raise ValueError(
                    f"{item!r} is not WIDTHxHEIGHT with multiples of 16, e.g. 1024x1024"
                )
        return value

    @field_validator("loras", mode="before")
    @classmethod
    def _split_loras(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("loras")
    @classmethod
    def _loras_name_hub_files(cls, value: list[str]) -> list[str]:
        for item in value:
            if not HUB_LORA.fullmatch(item):
                raise ValueError(
                    f"{item!r} is not name=org/repo or name=org/repo:file.safetensors (names: "
                    "letters, digits, '-' and '_')"
                )
        return value

    @field_validator("lora_dir")
    @classmethod
    def _lora_dir_has_names(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = _existing_folder(value)
        for path in value.glob("*.safetensors"):
            if not LORA_NAME.fullmatch(path.stem):
                raise ValueError(
                    f"file {path.name!r}: a LoRA's name is its file stem, and may only have "
                    "letters, digits, '-' and '_' (at most 64)"
                )
        return value

    @field_validator("api_key", "webhook_secret", "job_store_url", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("job_store_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("redis://", "rediss://")):
            raise ValueError("JOB_STORE_URL must start with redis:// or rediss://")
        return value

    @field_validator("allowed_local_media_dir")
    @classmethod
    def _local_dir_exists(cls, value: Path | None) -> Path | None:
        return None if value is None else _existing_folder(value)

    @model_validator(mode="after")
    def _resolve_model_id(self) -> Settings:
        if not self.model_id:
            self.model_id = DEFAULT_MODEL_IDS[self.model_type]
        elif self.model_id != TINY_MODEL_ID:
            _check_local_model_id(self.model_id)
        if self.min_image_side > self.max_image_side:
            raise ValueError("MIN_IMAGE_SIDE must not exceed MAX_IMAGE_SIDE")
        _check_speed_options(self)
        _check_lora_options(self)
        if self.webhook_secret is not None:
            webhook_key(self.webhook_secret.get_secret_value())
        return self

    @functools.cached_property
    def lora_names(self) -> list[str]:
        """The adapter names requests may use, in LORA_DIR then LORAS order."""
        names = (
            [p.stem for p in sorted(self.lora_dir.glob("*.safetensors"))] if self.lora_dir else []
        )
        return names + [item.partition("=")[0] for item in self.loras]

    @property
    def is_demo(self) -> bool:
        return self.model_id == TINY_MODEL_ID

    @property
    def warmup_sizes(self) -> list[tuple[int, int]]:
        return [(int(w), int(h)) for w, _, h in (item.partition("x") for item in self.warmup)]


def _existing_folder(value: Path) -> Path:
    if not value.is_dir():
        raise ValueError(f"folder {str(value)!r} does not exist")
    return value.resolve()


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after an optional 'whsec_' prefix."""
    import base64
    import binascii

    text = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < 16:
        raise ValueError(
            "WEBHOOK_SECRET: must be 'whsec_' plus base64 of at least 16 random bytes, e.g. "
            "whsec_$(openssl rand -base64 32)"
        )
    return key


LORA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
HUB_LORA = re.compile(r"[A-Za-z0-9_-]{1,64}=[\w.-]+/[\w.-]+(:[^:,=]+\.safetensors)?")


def _check_lora_options(settings: Settings) -> None:
    if not (settings.lora_dir or settings.loras):
        return
    if settings.model_type != "text2image":
        raise ValueError("LORA_DIR and LORAS: FLUX LoRA adapters are text2image only")
    clashing = {
        f"QUANTIZE={settings.quantize}": settings.quantize != "none",
        "FUSE_QKV": settings.fuse_qkv,
    }
    chosen = [name for name, on in clashing.items() if on]
    if chosen:
        raise ValueError(
            f"LoRA adapters with {', '.join(chosen)}: not supported together (LoRA layers wrap "
            "the unfused, unquantized projections); drop one"
        )


def _check_speed_options(settings: Settings) -> None:
    """Refuses option combinations that cannot work, whatever the hardware; the rest is checked
    against the device when the model loads."""
    if settings.decode_ahead and settings.model_type != "image2text":
        raise ValueError("DECODE_AHEAD: image2text only (it changes how tokens are decoded)")
    if settings.model_type == "image2text":
        text2image_only = {
            "COMPILE=regional": settings.compile == "regional",
            f"OFFLOAD={settings.offload}": settings.offload != "none",
            f"ATTENTION_BACKEND={settings.attention_backend}": settings.attention_backend
            != "native",
            "FUSE_QKV": settings.fuse_qkv,
            "CHANNELS_LAST": settings.channels_last,
            "STEP_CACHE_THRESHOLD": settings.step_cache_threshold > 0,
            f"COMPILE_MODE={settings.compile_mode}": settings.compile_mode != "default",
            "COMPILE_VAE": settings.compile_vae,
        }
        chosen = [name for name, on in text2image_only.items() if on]
        if chosen:
            raise ValueError(
                f"{', '.join(chosen)}: text2image only; image2text takes COMPILE=full, QUANTIZE, "
                "DECODE_AHEAD and ATTN_IMPLEMENTATION"
            )
    if settings.offload != "none" and settings.compile == "full":
        raise ValueError(
            "OFFLOAD with COMPILE=full: offload hooks break a whole-model graph; "
            "use COMPILE=regional"
        )
    if settings.offload != "none" and settings.compile_vae:
        raise ValueError("OFFLOAD with COMPILE_VAE: offload hooks move the VAE; drop one")
    if (
        settings.model_type == "text2image"
        and settings.compile_mode != "default"
        and settings.compile == "off"
        and not settings.compile_vae
    ):
        raise ValueError(
            f"COMPILE_MODE={settings.compile_mode} compiles nothing by itself: "
            "set COMPILE=regional or full, or COMPILE_VAE=true"
        )
    if settings.attention_backend.endswith("_hub"):
        raise ValueError(
            f"ATTENTION_BACKEND={settings.attention_backend}: hub kernels are "
            "downloaded at run time; install the package and use its local backend"
        )


def looks_like_path(model_id: str) -> bool:
    """A MODEL_ID that names a folder rather than a hub repository ('org/name')."""
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id


def _check_local_model_id(model_id: str) -> None:
    """Refuses a local-looking MODEL_ID that does not exist, so it never turns into hub retries."""
    path = Path(model_id).expanduser()
    looks_local = looks_like_path(model_id)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"MODEL_ID: {model_id!r} is a file; give a model folder or a hub id")
        return
    if looks_local:
        raise ValueError(
            f"MODEL_ID: folder {model_id!r} does not exist (a hub id looks like 'org/name')"
        )


SECRET_SETTINGS = frozenset({"api_key", "webhook_secret", "job_store_url"})


def describe_settings_error(error: ValidationError) -> str:
    """One line naming each bad variable and what it accepts."""
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a check across fields; its message names the variable itself
            parts.append(message)
            continue
        name = "_".join(str(p) for p in item["loc"]).upper()
        given = item.get("input")
        secret = str(item["loc"][0]) in SECRET_SETTINGS  # a key, or a URL with a password
        shown = f" (got {given!r})" if isinstance(given, (str, int, float)) and not secret else ""
        parts.append(f"{name}: {message}{shown}")
    return "invalid configuration: " + "; ".join(parts)


# Defaults that are computed rather than declared.
SHOWN_DEFAULTS = {
    "model_id": " / ".join(DEFAULT_MODEL_IDS.values()) + " (by MODEL_TYPE)",
    "cache_dir": "~/.cache/hunyuan-service",
}


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) of every setting, in declaration order: what `--help` lists
    and what the README's configuration table must match."""
    rows = []
    for name, field in Settings.model_fields.items():
        if name in SHOWN_DEFAULTS:
            default = SHOWN_DEFAULTS[name]
        elif field.default in (None, "", []):
            default = "unset"
        elif isinstance(field.default, bool):
            default = str(field.default).lower()
        else:
            default = str(field.default)
        choices = typing.get_args(field.annotation)
        meaning = field.description or ""
        if choices and all(isinstance(choice, str) for choice in choices):
            meaning = f"{' | '.join(choices)}: {meaning}"
        rows.append((name.upper(), default, meaning))
    return rows


def settings_help() -> str:
    """The settings part of `--help`: each variable, its default and what it means."""
    lines = ["settings (environment variables, or a .env file in the working directory):"]
    for variable, default, meaning in settings_table():
        lines.append(f"  {variable} (default: {default})")
        lines.extend(f"      {line}" for line in textwrap.wrap(meaning, 88))
    return "\n".join(lines)
