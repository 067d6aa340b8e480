"""Where a model's weights come from: a local folder, a hub id, or the built-in tiny demo."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hunyuan_service.settings import Settings

logger = logging.getLogger(__name__)


def resolve_checkpoint(settings: Settings) -> str:
    """Returns what to pass to `from_pretrained`, building the tiny demo checkpoint if asked for."""
    if settings.is_demo:
        from hunyuan_service.models.tiny import ensure_tiny_checkpoint

        folder = ensure_tiny_checkpoint(settings.model_type, settings.cache_dir)
        logger.warning(
            "DEMO MODEL: MODEL_ID=tiny serves a tiny random-weight %s model; its outputs are noise",
            settings.model_type,
        )
        return str(folder)
    return settings.model_id


def quiet_hf_progress() -> None:
    """Turns off the per-file progress bars that would otherwise flood the service log."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


_UNREACHABLE = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "gaierror")
_NOT_FOUND = ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError")


def describe_load_error(error: BaseException, settings: Settings) -> str | None:
    """One line naming the cause and the fix of a start-up failure an operator can fix.

    Returns None for anything unexpected, which is then logged with its traceback.
    """
    from hunyuan_service.errors import ModelLoadError
    from hunyuan_service.models.base import torch_is_out_of_memory

    if isinstance(error, ModelLoadError):
        return str(error)
    model_id = settings.model_id
    names: set[str] = set()
    cause: BaseException | None = error
    while cause is not None and len(names) < 20:
        names.add(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    if names & {"GatedRepoError"}:
        return f"MODEL_ID={model_id}: the repository is gated; accept its terms and set HF_TOKEN"
    if names & set(_NOT_FOUND):
        return f"MODEL_ID={model_id}: no such repository or file on the Hugging Face Hub"
    if names & set(_UNREACHABLE) or "not fully cached locally" in str(error):
        return (
            f"MODEL_ID={model_id}: not in the local Hugging Face cache, and the Hub cannot be "
            f"reached (offline, or no network); fetch it where the Hub is reachable "
            f"(`MODEL_ID={model_id} hunyuan-service download`), or set MODEL_ID to a local folder"
        )
    if "torch" in sys.modules and torch_is_out_of_memory(error):
        return (
            f"not enough {settings.device if settings.device != 'auto' else 'device'} memory to "
            f"load {model_id}; try OFFLOAD=model or QUANTIZE=int8 (text2image), or a smaller model"
        )
    return None


@contextlib.contextmanager
def reporting_download(
    model_id: str, report: Callable[[str], None], interval_s: float = 1.0
) -> Iterator[None]:
    """While the block loads `model_id` from the Hub, reports how much has reached the cache.

    `from_pretrained` downloads whatever is missing before it loads; this watches the model's
    folder in the Hugging Face cache grow, so /health and the log can say "downloading" rather
    than a long silent "loading". A local folder or the demo model is not watched.
    """
    from hunyuan_service.settings import TINY_MODEL_ID, looks_like_path

    hub_id = "/" in model_id and not looks_like_path(model_id)
    if model_id == TINY_MODEL_ID or not hub_id or Path(model_id).expanduser().exists():
        yield
        return
    from huggingface_hub.constants import HF_HUB_CACHE

    blobs = Path(HF_HUB_CACHE) / ("models--" + model_id.replace("/", "--")) / "blobs"
    before = _folder_size(blobs)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            files, size = _folder_size(blobs)
            if size > before[1]:
                report(
                    f"downloading {model_id}: {files - before[0]} files, "
                    f"{_amount(size - before[1])} so far"
                )

    watcher = threading.Thread(target=watch, name="hunyuan-download-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=5)
        report("loading model")


def _amount(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _folder_size(folder: Path) -> tuple[int, int]:
    """Files and bytes in `folder` (partial downloads included); (0, 0) if it does not exist."""
    files = size = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                size += entry.stat().st_size
                files += 1
    return files, size


# Files `from_pretrained` reads for Qwen2.5-VL: weights, configs, tokenizer and chat template.
QWEN_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


def download_checkpoint(settings: Settings) -> str:
    """Fetches MODEL_ID into the Hugging Face cache (only what the pipeline loads); returns the
    local folder. A local folder or the demo model needs nothing fetched."""
    if settings.is_demo:
        return resolve_checkpoint(settings)
    model_id = settings.model_id
    if Path(model_id).expanduser().is_dir():
        return model_id
    if settings.model_type == "text2image":
        from diffusers import FluxPipeline

        return str(FluxPipeline.download(model_id))
    from huggingface_hub import snapshot_download

    return str(snapshot_download(model_id, allow_patterns=QWEN_FILES))
