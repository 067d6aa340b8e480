"""Importing the service must stay cheap: no ML framework until a model is selected and loaded."""

from __future__ import annotations

import subprocess
import sys


def test_package_app_and_worker_import_no_ml_framework() -> None:
    code = (
        "import sys\n"
        "import hunyuan_service, hunyuan_service.api.app, hunyuan_service.engine.engine\n"
        "import hunyuan_service.settings, hunyuan_service.api.schemas\n"
        "import hunyuan_service.models.registry, hunyuan_service.models.types\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'qwen_vl_utils') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
