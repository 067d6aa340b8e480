"""Maps MODEL_TYPE to its model class, importing only the selected model's module."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hunyuan_service.models.base import InferenceModel
    from hunyuan_service.settings import Settings

# model type -> "module:ClassName"; adding a model type is one file plus one line here.
MODEL_CLASSES: dict[str, str] = {
    "text2image": "hunyuan_service.models.flux:FluxModel",
    "image2text": "hunyuan_service.models.qwen_vl:QwenVLModel",
}


def get_model(settings: Settings) -> InferenceModel:
    """Builds the (unloaded) model for `settings.model_type`; cheap, imports its module lazily."""
    target = MODEL_CLASSES[settings.model_type]
    module_name, _, class_name = target.partition(":")
    model_class = getattr(importlib.import_module(module_name), class_name)
    return model_class(settings)
