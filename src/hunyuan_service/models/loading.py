"""Where a model's weights come from: a local folder, a hub id, or the built-in tiny demo."""

from __future__ import annotations

import logging
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
