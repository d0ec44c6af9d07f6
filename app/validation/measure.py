"""The measurement: both models answer every prompt in one process, on the same hardware,
interleaved request by request, through the Generator's own code path.

One :class:`~app.generation.service.GeneratorService` holds the base model with the candidate's
and the champion's adapters attached (the base model alone answers for a baseline without a
champion, as the Generator does for requests that name no adapter). Every prompt is answered by
both arms, one right after the other, the order alternating from prompt to prompt, so that
whatever else the machine does at that moment falls on both. Greedy decoding, up to
``validation.max_new_tokens`` tokens.

What is measured:

* each answer, its wall-clock latency (``GeneratorService.complete``, prompt rendering
  included) and its completion tokens;
* throughput at each of ``validation.concurrency``: that many requests answered together in one
  batched ``generate`` call (what the Generator's request batching does with concurrent
  requests), over the candidate's own validation prompts, batch by batch alternating the arms;
* peak memory of each arm: the base model's parameter bytes, plus the arm's own adapter's
  parameter bytes, plus the peak of what answering the largest batch allocates on top of what was
  allocated before it. On a GPU that peak is ``torch.cuda.max_memory_allocated`` less the
  allocation before the batch. On a CPU it is the rise of the process's resident set: freed heap
  memory is first handed back to the system (glibc's ``malloc_trim``), the kernel's high-water
  mark is reset (``/proc/self/clear_refs``) and read back after the batch (``VmHWM`` less
  ``VmRSS`` before); where that reset is not allowed, ``VmRSS`` is sampled every millisecond
  instead. Each arm is measured twice (candidate, baseline, baseline, candidate) and the smaller
  peak kept: the first batch of a process also pays for one-off allocations.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.validation.inputs import EvalSet, Subjects

if TYPE_CHECKING:
    from app.generation import ChatCompletionRequest, GeneratorService

__all__ = [
    "ARMS",
    "Answer",
    "MeasureOptions",
    "Measurements",
    "MemoryUse",
    "Pair",
    "PeakMemory",
    "SetAnswers",
    "Throughput",
    "measure",
]

ARMS = ("candidate", "baseline")


@dataclass(frozen=True)
class Pair:
    """One measured quantity for each arm."""

    candidate: float
    baseline: float

    @property
    def change(self) -> float:
        """Candidate less baseline."""
        return self.candidate - self.baseline

    @property
    def relative_change(self) -> float:
        """Candidate over baseline, less 1 (0 when both are 0; +inf from a baseline of 0)."""
        if self.baseline == 0:
            return 0.0 if self.candidate == 0 else math.inf
        return self.candidate / self.baseline - 1.0


@dataclass(frozen=True)
class MeasureOptions:
    """How the models are loaded and asked."""

    base_model: str
    storage_root: str
    max_new_tokens: int
    concurrency: tuple[int, ...]
    device: str | None = None
    """``cuda`` or ``cpu``; default ``cuda`` where available."""


@dataclass(frozen=True)
class Answer:
    """One model's answer to one prompt."""

    text: str
    latency_ms: float
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class SetAnswers:
    """Both models' answers to one set, in the order of its cases; None where the prompt did
    not fit the model's context (for both: they share the base model)."""

    name: str
    candidate: tuple[Answer | None, ...]
    baseline: tuple[Answer | None, ...]

    def of(self, arm: str) -> tuple[Answer | None, ...]:
        return self.candidate if arm == "candidate" else self.baseline

    @property
    def unanswered(self) -> int:
        return sum(a is None for a in self.candidate)


@dataclass(frozen=True)
class Throughput:
    """Requests and completion tokens per second at one concurrency, for each arm."""

    concurrency: int
    batches: int
    candidate_requests_per_s: float
    baseline_requests_per_s: float
    candidate_tokens_per_s: float
    baseline_tokens_per_s: float


@dataclass(frozen=True)
class MemoryUse:
    """An arm's memory while it answers the largest batch (see the module docstring)."""

    weights_bytes: int
    """The base model's parameters."""
    adapter_bytes: int
    """The arm's own adapter's parameters (0 for the base model)."""
    working_bytes: int
    """The peak allocated on top of what was allocated before the batch."""

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.adapter_bytes + self.working_bytes


@dataclass(frozen=True)
class Measurements:
    """Everything :func:`measure` saw."""

    device: str
    torch_threads: int
    answers: tuple[SetAnswers, ...]
    """One per set, in the order of the sets given."""
    throughput: tuple[Throughput, ...]
    candidate_memory: MemoryUse
    baseline_memory: MemoryUse
    memory_method: str
    seconds: float


def measure(subjects: Subjects, sets: Sequence[EvalSet], options: MeasureOptions) -> Measurements:
    """Load the base model and both adapters, and measure both arms on every set.

    Args:
        subjects: the candidate and the baseline.
        sets: every set to answer; the first with role ``own`` gives the throughput and memory
            prompts.

    Raises:
        ValueError: no set has role ``own``, or none of its prompts fits the context.
    """
    import torch

    from app.generation import GeneratorService

    started = time.perf_counter()
    own_index = next((i for i, s in enumerate(sets) if s.role == "own"), None)
    if own_index is None:
        raise ValueError("sets: no set of role 'own' to measure throughput and memory on")
    service = GeneratorService(options.base_model, root=options.storage_root, max_adapters=2, device=options.device)
    weights = _parameter_bytes(service.model)
    adapters = {"candidate": subjects.candidate, "baseline": subjects.baseline}
    own_bytes = {arm: _attach(service, adapter_id) for arm, adapter_id in adapters.items()}
    requests = [_requests(service, s, options.max_new_tokens) for s in sets]
    own_requests = [r for r in requests[own_index] if r is not None]
    if not own_requests:
        own = sets[own_index]
        raise ValueError(f"validation: none of the {len(own.cases)} prompts of {own.source} fits the model's context")

    for arm in ARMS:  # the first call of each arm pays for lazy initialisation
        service.complete(own_requests[0], adapters[arm])
    answers = _answer_all(service, sets, requests, adapters)
    throughput = tuple(_throughput(service, own_requests, c, adapters) for c in options.concurrency)
    meter = PeakMemory(service.device)
    working = _working_memory(meter, service, _batches(own_requests, max(options.concurrency))[0], adapters)
    return Measurements(
        device=str(service.device),
        torch_threads=torch.get_num_threads(),
        answers=answers,
        throughput=throughput,
        candidate_memory=MemoryUse(weights, own_bytes["candidate"], working["candidate"]),
        baseline_memory=MemoryUse(weights, own_bytes["baseline"], working["baseline"]),
        memory_method=meter.method,
        seconds=round(time.perf_counter() - started, 3),
    )


def _requests(service: GeneratorService, evaluated: EvalSet, max_new_tokens: int) -> list[ChatCompletionRequest | None]:
    """Each case as a greedy request; None for one the Generator would refuse (a conversation it
    cannot read, or too long for the context): left out for both arms."""
    from pydantic import ValidationError

    from app.generation import ChatCompletionRequest, GenerationRequestError

    out: list[ChatCompletionRequest | None] = []
    for case in evaluated.cases:
        try:
            request = ChatCompletionRequest.model_validate(
                {"model": "validation", "messages": list(case.messages), "temperature": 0, "max_tokens": max_new_tokens}
            )
            service.prepare(request)
        except (ValidationError, GenerationRequestError):
            out.append(None)
        else:
            out.append(request)
    return out


def _answer_all(
    service: GeneratorService,
    sets: Sequence[EvalSet],
    requests: Sequence[Sequence[ChatCompletionRequest | None]],
    adapters: dict[str, str | None],
) -> tuple[SetAnswers, ...]:
    """Both arms' answers to every request, one right after the other, alternating which first."""
    turn = 0
    answers = []
    for s, asked in zip(sets, requests, strict=True):
        got: dict[str, list[Answer | None]] = {arm: [] for arm in ARMS}
        for request in asked:
            if request is None:
                for arm in ARMS:
                    got[arm].append(None)
                continue
            for arm in _order(turn):
                got[arm].append(_answer(service, request, adapters[arm]))
            turn += 1
        answers.append(SetAnswers(s.name, tuple(got["candidate"]), tuple(got["baseline"])))
    return tuple(answers)


def _working_memory(
    meter: PeakMemory, service: GeneratorService, batch: list[ChatCompletionRequest], adapters: dict[str, str | None]
) -> dict[str, int]:
    """Each arm's working memory on ``batch``: measured twice (candidate, baseline, baseline,
    candidate), the smaller kept."""
    working: dict[str, list[int]] = {arm: [] for arm in ARMS}
    for arm in ("candidate", "baseline", "baseline", "candidate"):
        working[arm].append(meter.measure(lambda arm=arm: service.complete_batch(batch, adapters[arm])))
    return {arm: min(values) for arm, values in working.items()}


def _order(turn: int) -> tuple[str, ...]:
    return ARMS if turn % 2 == 0 else ARMS[::-1]


def _answer(service: GeneratorService, request: ChatCompletionRequest, adapter_id: str | None) -> Answer:
    start = time.perf_counter()
    generation = service.complete(request, adapter_id)
    latency = (time.perf_counter() - start) * 1000.0
    choice = generation.completion.choices[0]
    return Answer(
        text=choice.message.content or "",
        latency_ms=latency,
        completion_tokens=generation.completion.usage.completion_tokens,
        finish_reason=str(choice.finish_reason),
    )


def _batches(requests: Sequence[Any], size: int) -> list[list[Any]]:
    """``requests`` in batches of exactly ``size``, the last filled from the start again (at
    least one batch)."""
    count = max(1, math.ceil(len(requests) / size))
    return [[requests[(k * size + j) % len(requests)] for j in range(size)] for k in range(count)]


def _throughput(
    service: GeneratorService, requests: Sequence[ChatCompletionRequest], size: int, adapters: dict[str, str | None]
) -> Throughput:
    seconds = dict.fromkeys(ARMS, 0.0)
    tokens = dict.fromkeys(ARMS, 0)
    batches = _batches(requests, size)
    for turn, batch in enumerate(batches):
        for arm in _order(turn):
            start = time.perf_counter()
            generations = service.complete_batch(batch, adapters[arm])
            seconds[arm] += time.perf_counter() - start
            tokens[arm] += sum(g.completion.usage.completion_tokens for g in generations)
    done = len(batches) * size
    return Throughput(
        concurrency=size,
        batches=len(batches),
        candidate_requests_per_s=done / seconds["candidate"],
        baseline_requests_per_s=done / seconds["baseline"],
        candidate_tokens_per_s=tokens["candidate"] / seconds["candidate"],
        baseline_tokens_per_s=tokens["baseline"] / seconds["baseline"],
    )


# --- memory ----------------------------------------------------------------------------------------


def _parameter_bytes(model: Any, names: set[str] | None = None) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if names is None or name in names)


def _attach(service: GeneratorService, adapter_id: str | None) -> int:
    """Attach an adapter and return the bytes of the parameters it added (0 for None)."""
    if adapter_id is None:
        return 0
    # Only LoRA's own parameters: the first adapter wraps the model, which renames every other one.
    before = _lora_names(service.model)
    service.load_adapter(adapter_id)
    return _parameter_bytes(service.model, _lora_names(service.model) - before)


def _lora_names(model: Any) -> set[str]:
    return {name for name, _ in model.named_parameters() if "lora_" in name}


class PeakMemory:
    """The peak of what a call allocates on top of what was allocated before it, in bytes (see
    the module docstring for how, on each kind of device); :attr:`method` says which was used."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated during the batch, less the allocation before it"
        elif _can_reset_peak_rss():
            self.method = "resident set high-water mark (VmHWM, reset through /proc/self/clear_refs) less VmRSS before"
        elif _rss_bytes() is not None:
            self.method = "the highest VmRSS sampled every millisecond during the batch, less VmRSS before"
        else:
            self.method = "not measured: this system has no /proc/self/status (working bytes are 0)"

    def measure(self, call: Callable[[], Any]) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            call()
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - before)
        _release_free_heap()
        before = _rss_bytes()
        if before is None:
            call()
            return 0
        if self.method.startswith("resident set high-water"):
            _reset_peak_rss()
            call()
            return max(0, (_status_bytes("VmHWM") or before) - before)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_bytes() or 0)
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            call()
        finally:
            done.set()
            sampler.join()
        return max(0, peak[0] - before)


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one (Linux >= 4.0)
        return True
    except OSError:
        return False


def _can_reset_peak_rss() -> bool:
    return _status_bytes("VmHWM") is not None and _reset_peak_rss()


def _release_free_heap() -> None:
    """Give freed heap memory back to the system, so that reusing it counts as a rise again."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)
