"""The model a fine-tuning worker trains: the base model on its device with a LoRA adapter (fresh,
from a seed, or the parent's), and the loss module that DDP or DeepSpeed wraps."""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.learning.tokenization import IGNORE_INDEX
from app.learning.training import AdapterConfig, FinetuneConfig, ResourceConfig

__all__ = ["CausalLMLoss", "init_lora", "load_lora_model", "require", "setup_device"]


class CausalLMLoss(nn.Module):
    """Wraps a (PEFT) causal LM to return the summed token cross-entropy on the labelled
    positions and their count, computing the vocabulary head only at those positions: with
    Qwen's 152k-row head that is most of a step's cost, and prompts are most of the tokens.
    DDP and DeepSpeed wrap this module, so its forward is the one they synchronise: the
    preference loss's per-row log-likelihoods come from the same forward (``per_row``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, per_row: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum, labels)``: the summed cross-entropy and the number of labelled tokens; with
        ``per_row``, ``(log_likelihoods, labels)`` of each row instead: the sum of its labelled
        tokens' log-probabilities (an answer's log-likelihood, what DPO compares) and their count,
        each of shape ``[rows]``."""
        logits, targets, keep = self._labelled_logits(input_ids, attention_mask, labels)
        if not per_row:
            return F.cross_entropy(logits.float(), targets, reduction="sum"), keep.sum()
        token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
        rows_of_labels = keep.nonzero()[:, 0]
        logps = torch.zeros(keep.shape[0], device=token_logps.device, dtype=token_logps.dtype)
        return logps.index_add(0, rows_of_labels, token_logps), keep.sum(dim=1)

    @torch.no_grad()
    def measure(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The summed loss and label count of :meth:`forward`, and how many of the rows with labels
        the model answers exactly: every labelled token is the most likely one given the tokens
        before it. That is what greedy decoding would write (each step sees the reference's prefix
        only while every earlier token was right), so it is the exact-match score of the answers,
        measured in the same forward pass as the loss. Returns ``(loss_sum, labels, exact_rows,
        rows)``."""
        logits, targets, keep = self._labelled_logits(input_ids, attention_mask, labels)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        wrong = (logits.argmax(dim=-1) != targets).to(torch.float32)
        rows_of_labels = keep.nonzero()[:, 0]
        wrong_per_row = torch.zeros(keep.shape[0], device=wrong.device).index_add_(0, rows_of_labels, wrong)
        labelled = keep.any(dim=1)
        return loss, keep.sum(), (labelled & (wrong_per_row == 0)).sum(), labelled.sum()

    def _labelled_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head's logits at the labelled positions only, their targets, and where they are."""
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
        return logits, targets[keep], keep


def setup_device(options: ResourceConfig, device: torch.device, max_vram_gb: float) -> None:
    """Make ``device`` this process's GPU, its memory capped at ``max_vram_gb``
    (``training.resource_limits.max_vram_gb``); nothing on a CPU.

    Raises:
        RuntimeError: ``use_gpu`` on a device that is not CUDA.
    """
    if options.use_gpu and device.type != "cuda":
        raise RuntimeError(f"finetune.use_gpu is true but the worker's device is {device}: no CUDA here")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        total = torch.cuda.get_device_properties(device).total_memory
        # training.resource_limits.max_vram_gb, enforced by torch's caching allocator.
        torch.cuda.set_per_process_memory_fraction(min(1.0, max_vram_gb * 2**30 / total), device)


def load_lora_model(
    opts: FinetuneConfig,
    device: torch.device,
    *,
    base_model: str,
    storage_root: str,
    parent_adapter_id: str | None,
) -> tuple[nn.Module, Any]:
    """The base model from its checkpoint directory, with a fresh LoRA adapter (initialised from
    ``opts.seed``, :func:`init_lora`) or the parent's, in training mode; and its tokenizer.

    Raises:
        ImportError: ``quantize_4bit`` without bitsandbytes.
    """
    from peft import get_peft_model

    from app.model import load_model

    if opts.quantize_4bit:
        require("bitsandbytes", "finetune.quantize_4bit")
    dtype = torch.bfloat16 if opts.precision == "bf16" and device.type == "cuda" else torch.float32
    model, tokenizer = load_model(
        base_model, root=storage_root, device=device, dtype=dtype, quantize_4bit=opts.quantize_4bit
    )
    model.config.use_cache = False  # no KV cache in training (and none with checkpointing)
    checkpointing = {"use_reentrant": False}  # works with DDP and frozen inputs
    if opts.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=opts.gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    elif opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if parent_adapter_id is not None:
        from app.model.adapters import AdapterStore

        peft_model = AdapterStore(storage_root).attach(model, parent_adapter_id, is_trainable=True)
    else:
        peft_model = get_peft_model(model, _lora_config(opts))
        init_lora(peft_model, opts.seed)
    peft_model.train()
    return peft_model, tokenizer


def _lora_config(options: AdapterConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=options.lora_rank,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=list(options.target_modules),
        task_type="CAUSAL_LM",
    )


@torch.no_grad()
def init_lora(peft_model: nn.Module, seed: int) -> None:
    """A fresh adapter's initialisation drawn from ``seed`` alone (LoRA's A random, B zero), so that
    a run's seed decides it whatever else used the random generator before (the same on every rank)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.reset_lora_parameters(name, True)


def require(package: str, key: str) -> Any:
    """Import ``package``, which the option ``key`` needs.

    Raises:
        ImportError: it is not installed; the message names the extra that installs it.
    """
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"{key} needs the {package} package: pip install 'kaizen[gpu]'") from exc
