"""Where the model loaders' create-once folders come from, kept importable under their old names.

The storage root, the ``models/`` folder, the create-once publish of a built tokenizer or model
and file hashing now live in :mod:`app.artifacts`, the one home of every artifact kind. Nothing
else belongs here: ``app/model/tokenizer.py``, ``app/model/profiles.py``, ``app/learning/dataset.py``,
``jobs/finetune.py`` and ``jobs/synthesize.py`` still import these names from this module, and this
module goes once they import :mod:`app.artifacts` instead.
"""

from __future__ import annotations

from app.artifacts import DEFAULT_ROOT, ensure_directory, file_sha256, models_dir

__all__ = ["DEFAULT_ROOT", "ensure_directory", "file_sha256", "models_dir"]
