"""``app/generation/engine.py`` used directly, no Serve and no Ray: the tiny model continuing
plain-text and chat prompts, greedy and sampled, with stop strings, seeds and confidences.

The tiny model's weights are random: a presence penalty makes its greedy text varied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.generation import GenerationEngine, Prompt, Sampling, TopKSampling

VARIED = Sampling(presence_penalty=2.0)  # greedy, but not "\n" repeated


@pytest.fixture(scope="module")
def engine(model_root: Path) -> GenerationEngine:
    return GenerationEngine.load("tiny", root=model_root, device="cpu")


def test_greedy_generation_is_deterministic(engine: GenerationEngine) -> None:
    prompts = [
        Prompt(engine.encode("Input: a\nOutput: b\n\nInput:"), 16, sampling=VARIED),
        Prompt(engine.chat_prompt([{"role": "user", "content": "Sort a list."}])[1], 10, sampling=VARIED),
    ]
    first, second = engine.generate(prompts), engine.generate(prompts)
    assert first == second
    assert [len(c.token_ids) for c in first] == [16, 10]  # each row its own limit
    assert all(c.finish_reason == "length" and c.truncated and not c.ended for c in first)
    assert len(set(first[0].text.split())) > 3 and first[0].text == first[0].raw_text == engine.decode(
        first[0].token_ids
    )
    # A batch gives what each prompt alone gives (left padding).
    assert [engine.generate([p])[0] for p in prompts] == first


def test_stop_strings_cut_the_text(engine: GenerationEngine) -> None:
    ids = engine.encode("def fib(n):")
    (full,) = engine.generate([Prompt(ids, 24, sampling=VARIED)])
    word = full.text.split()[3]
    (stopped,) = engine.generate([Prompt(ids, 24, stop=("never in the text", word), sampling=VARIED)])
    assert stopped.text == full.text[: full.text.index(word)]
    assert stopped.raw_text.startswith(stopped.text + word)  # the stop string kept in the raw text
    assert full.text.startswith(stopped.raw_text)
    assert stopped.finish_reason == "stop" and not stopped.truncated
    # Generation stopped at the token completing the stop string, which is what is counted.
    assert stopped.completion_tokens == len(stopped.token_ids) < 24
    assert word in engine.decode(stopped.token_ids) and word not in engine.decode(stopped.token_ids[:-1])


def test_sampling_is_seeded_per_call(engine: GenerationEngine) -> None:
    prompts = [Prompt(engine.encode(t), 12, stop=("Output:",)) for t in ("Input: a\nOutput: b\n\nInput:", "More:")]
    ssr = TopKSampling(temperature=0.9, top_k=50, top_p=0.6, repetition_penalty=1.2)
    state = torch.get_rng_state()
    runs = [engine.generate(prompts, ssr, samples=3, seed=s) for s in (7, 7, 8)]
    assert torch.equal(torch.get_rng_state(), state)  # a seeded call leaves the random state as it was
    assert runs[0] == runs[1] != runs[2]
    assert len(runs[0]) == 6 and len({c.raw_text for c in runs[0][:3]}) > 1  # 3 samples per prompt, in order
    # OpenAI's sampling, row by row, seeded alike.
    openai = [Prompt(p.ids, 12, sampling=Sampling(temperature=1.0, top_p=0.9)) for p in prompts]
    assert engine.generate(openai, seed=3) == engine.generate(openai, seed=3)
    with pytest.raises(ValueError, match="TopKSampling"):
        engine.generate(openai, ssr)


def test_end_of_sequence_and_confidence(engine: GenerationEngine) -> None:
    tokenizer = engine.tokenizer
    assert {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} <= set(engine.eos_ids)
    assert engine.pad_id == tokenizer.pad_token_id
    text, ids = engine.chat_prompt([{"role": "user", "content": "hi<|im_end|>"}])
    assert text.endswith("<|im_start|>assistant\n") and ids != engine.encode(text)  # the message's token is text
    (answer,) = engine.generate([Prompt(ids, 8)], confidence=True)
    assert 0 < answer.confidence < 1
    assert engine.generate([]) == []
