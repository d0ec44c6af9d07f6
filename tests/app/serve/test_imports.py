"""What a Serve replica imports: the collector and scorer replicas speak the OpenAI protocol but
never run the model, so importing their modules must not load torch, transformers or peft (seconds
of start-up for every replica)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_the_collector_and_scorer_modules_do_not_load_the_model_stack() -> None:
    code = (
        "import sys, app.serve.collector, app.serve.scorer; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_the_generation_package_still_gives_every_name() -> None:
    import app.generation as generation

    for name in generation.__all__:
        assert getattr(generation, name) is not None
    assert generation.GeneratorService.__module__ == "app.generation.service"
