"""``app/generation/adapter_cache.py`` through the service: LoRA adapters attached, routed and
evicted, and the model lock that keeps an adapter from changing under a generation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from app.generation import GenerationRequestError, GeneratorService, UnknownModelError
from app.model.adapters import AdapterStore
from tests.app.generation.common import ANSWER, PROMPTS, request


def test_adapter_answers_and_none_is_the_base_model(service: GeneratorService, base_texts: dict[str, str]) -> None:
    service.load_adapter("a1")
    assert service.loaded_adapters() == ["a1"]
    adapted = service.complete(request("What is 2+2?", max_tokens=16), "a1")  # a prompt it was not trained on
    assert adapted.text == ANSWER and adapted.finish_reason == "stop" and adapted.adapter_id == "a1"
    # The answer's tokens and the <|im_end|> that ended it.
    assert adapted.completion_tokens == len(service.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]) + 1
    assert adapted.model_version == "a1"

    # adapter_id=None is the plain base model, adapter attached or not; batches too.
    assert service.complete(request("hi")).text == base_texts["hi"]
    batch = service.complete_batch([request(p) for p in PROMPTS], None)
    assert [g.text for g in batch] == [base_texts[p] for p in PROMPTS]
    batch = service.complete_batch([request(p, max_tokens=16) for p in PROMPTS], "a1")
    assert [g.text for g in batch] == [ANSWER] * 3
    streamed = service.stream(request("hi", max_tokens=16, stream=True), "a1")
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == ANSWER


def test_adapters_are_evicted_least_recently_used_first(
    model_root: Path, store: AdapterStore, base_texts: dict[str, str]
) -> None:
    from peft import PeftModel

    service = GeneratorService("tiny", root=model_root, adapter_store=store, max_adapters=2, device="cpu")
    manifest = service.load_adapter("a1")
    assert manifest.adapter_id == "a1" and isinstance(service.model, PeftModel)
    service.load_adapter("a2")
    a2_text = service.complete(request(max_tokens=8), "a2").text
    assert a2_text != ANSWER and not base_texts["hi"].startswith(a2_text)  # neither a1 nor the base
    service.complete(request(max_tokens=16), "a1")  # a1 is now the most recently used
    assert service.loaded_adapters() == ["a2", "a1"]

    service.load_adapter("a3")
    assert service.loaded_adapters() == ["a1", "a3"]
    assert len(service.model.peft_config) == 2  # a2's weights were deleted from the model
    # A request for an evicted adapter attaches it again (evicting a1), with its own weights.
    assert service.complete(request(max_tokens=8), "a2").text == a2_text
    assert service.loaded_adapters() == ["a3", "a2"]
    assert service.complete(request(max_tokens=16), "a3").text == ANSWER

    assert service.unload_adapter("a3") and not service.unload_adapter("a3")
    assert service.unload_adapter("a2") and service.loaded_adapters() == []
    assert not isinstance(service.model, PeftModel)  # the last one gone, the plain model is back
    assert service.complete(request()).text == base_texts["hi"]


def test_loading_an_adapter_waits_for_a_stream_in_flight(service: GeneratorService, base_texts: dict[str, str]) -> None:
    expected = service.complete(request(max_tokens=32)).text
    stream = service.stream(request(max_tokens=32, stream=True))
    pieces = [next(stream).choices[0].delta.content, next(stream).choices[0].delta.content]  # under way
    loaded: list[float] = []
    loader = threading.Thread(target=lambda: (service.load_adapter("a2"), loaded.append(time.perf_counter())))
    loader.start()
    pieces += [c.choices[0].delta.content or "" for c in stream if c.choices]
    loader.join(timeout=60)
    assert loaded, "load_adapter did not return"
    # Had a2 been attached mid-generation, the rest of the text would be a2's.
    assert "".join(pieces) == expected
    assert "a2" in service.loaded_adapters()
    assert service.complete(request("hi")).text == base_texts["hi"]


def test_unknown_or_foreign_adapter_names_the_model(service: GeneratorService) -> None:
    with pytest.raises(UnknownModelError) as info:
        service.complete(request(), "no-such-adapter")
    assert info.value.field == "model" and info.value.status_code == 404 and "no-such-adapter" in str(info.value)
    assert info.value.to_openai()["error"]["param"] == "model"
    with pytest.raises(UnknownModelError):
        service.stream(request(stream=True), "../escape")
    with pytest.raises(GenerationRequestError, match="trained on base model 'another-model'") as info:
        service.load_adapter("other-base")
    assert info.value.field == "model"
