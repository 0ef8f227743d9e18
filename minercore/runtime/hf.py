"""The ``hf`` backend: any ``AutoModelForCausalLM`` directory behind the same ``Runner`` interface.

Correctness over speed: every slot keeps its own ``past_key_values`` and a decode step runs one forward
per active slot (no padding, no attention masks, nothing model-specific to get wrong). Sampling, echo
steering and per-slot state are shared with the simulated runner, so both backends give the same ids for
the same logits. Eager only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..contract.config import ModelOptions, context_for
from .device import dtype_name, select, tensor_bytes
from .protocol import Launched
from .sampling import SlotParams, SlotState, check_room, check_slot, prefill_slot, slot_tokens

logger = logging.getLogger(__name__)


def _positions_limit(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _kv_bytes_per_slot(config: Any, max_context: int, dtype: torch.dtype) -> int:
    """2 (K and V) x layers x context x KV heads x head dim x bytes, from the standard config names (GPT-2's
    own names map onto them); 0 if the config does not say."""
    try:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
    except AttributeError:
        return 0
    return 2 * layers * max_context * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class HFRunner:
    """A Hugging Face causal LM, one KV cache per slot."""

    kind = "hf"  # the model.backend value this runner serves
    compiled = False

    def __init__(self, model: nn.Module, *, max_batch: int, max_context: int, eos_id: int,
                 device: torch.device, dtype: torch.dtype, name: str = "model", stop_ids: Sequence[int] = ()) -> None:
        limit = _positions_limit(model.config)
        if limit is not None and max_context > limit:
            raise ValueError(f"max_context {max_context} exceeds the model's {limit} positions; "
                             f"use max_context <= {limit}")
        if max_batch < 1 or max_context < 2:
            raise ValueError(f"max_batch must be >= 1 and max_context >= 2, got {max_batch}, {max_context}")
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        if not 0 <= eos_id < self.vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size {self.vocab_size})")
        self.max_batch = max_batch
        self.max_context = max_context
        self.eos_id = eos_id
        self.device = device
        self.dtype = dtype
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.state = SlotState(max_batch, max_context, device, stop_ids or (eos_id,))
        # Grown on demand by each slot's DynamicCache; this is its size at max_context.
        self.kv_cache_bytes_per_slot = _kv_bytes_per_slot(model.config, max_context, dtype)
        self.kv_bytes = self.kv_cache_bytes_per_slot * max_batch
        self.weights_bytes = tensor_bytes(self.model)
        self._past: dict[int, Any] = {}  # slot -> its past_key_values
        self._pos = np.zeros(max_batch, dtype=np.int64)
        self._kind = np.zeros(max_batch, dtype=np.int8)
        params = sum(p.numel() for p in model.parameters())
        self.description = (f"hf {name} [{model.config.model_type}, {params / 1e6:.1f}M params], "
                            f"max_batch {max_batch}, max_context {max_context}, {device}, {dtype_name(dtype)}, "
                            f"eager, one KV cache per slot")

    @classmethod
    def from_options(cls, options: ModelOptions, *, max_batch: int, eos_id: int,
                     stop_ids: Sequence[int] = ()) -> HFRunner:
        if not options.path:
            raise ValueError("backend hf needs path = a local model directory or GGUF file")
        if options.compile in ("on", "blocks"):
            raise ValueError("backend hf runs eager; use compile=auto or off")
        if options.quant not in ("auto", "none"):  # also a native path that fell back here (build_runner)
            raise ValueError(f"{options.path}: quant {options.quant} needs the native backend, and this model is "
                             f"served by transformers (backend hf); use quant none")
        from transformers import AutoModelForCausalLM

        from ..models.loading import inspect

        checkpoint = inspect(options.path)
        device, dtype = select(options.device, options.dtype)
        where = Path(checkpoint.path)
        # transformers dequantizes a GGUF file's tensors itself (it needs the gguf package, as native does).
        located = ({"pretrained_model_name_or_path": where.parent, "gguf_file": where.name}
                   if checkpoint.format == "gguf" else {"pretrained_model_name_or_path": where})
        model = AutoModelForCausalLM.from_pretrained(**located, dtype=dtype, local_files_only=True)
        max_context = context_for(options.max_context, _positions_limit(model.config))
        return cls(model, max_batch=max_batch, max_context=max_context, eos_id=eos_id, device=device,
                   dtype=dtype, name=options.path, stop_ids=stop_ids)

    @torch.inference_mode()
    def warmup(self) -> float:
        """One prefill and one decode step on a free slot (eager: nothing to compile, kernels to load)."""
        started = time.perf_counter()
        slot = next((s for s in range(self.max_batch) if s not in self._past), None)
        if slot is not None:
            self.prefill(slot, [self.eos_id], SlotParams(echo=False))
            self.decode(np.array([slot]))
            self.release(slot)
        seconds = time.perf_counter() - started
        logger.info("warmup: %.1f s (%s)", seconds, self.description)
        return seconds

    @torch.inference_mode()
    def prefill(self, slot: int, prompt_ids: Sequence[int], params: SlotParams) -> int:
        def last_logits(ids: torch.Tensor) -> torch.Tensor:
            self._past.pop(slot, None)  # before the forward, so the old cache is freed before the new one grows
            out = self.model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
            self._past[slot] = out.past_key_values
            return out.logits[:, -1].float()

        first = prefill_slot(self.state, slot, prompt_ids, params, vocab_size=self.vocab_size, eos_id=self.eos_id,
                             last_logits=last_logits)
        self._pos[slot] = len(prompt_ids)
        self._kind[slot] = params.kind()
        return first

    @torch.inference_mode()
    def launch(self, slots: np.ndarray) -> Launched:
        """Synchronous: the step is done, its ids on the host, when this returns."""
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return Launched(slots, np.empty(0, dtype=np.int64))
        if len(set(slots.tolist())) != slots.size or not all(int(s) in self._past for s in slots):
            raise ValueError(f"decode: slots must be distinct and prefilled; got {slots}")
        check_room(self._pos, slots, self.max_context)
        rows = torch.from_numpy(slots).to(self.device)
        logits = []
        for slot in slots.tolist():
            token = self.state.tokens[slot:slot + 1, None]
            out = self.model(input_ids=token, past_key_values=self._past[slot], use_cache=True)
            self._past[slot] = out.past_key_values
            logits.append(out.logits[:, -1])
        pos = self.state.pos[rows]
        ids = slot_tokens(torch.cat(logits).float(), self.state, rows, pos, int(self._kind[slots].max()))
        self.state.tokens[rows] = ids
        self.state.pos[rows] += 1
        self._pos[slots] += 1
        return Launched(slots, ids.cpu().numpy())  # the step's one host sync

    def collect(self, step: Launched) -> np.ndarray:
        return step.host_ids

    def decode(self, slots: np.ndarray) -> np.ndarray:
        return self.collect(self.launch(slots))

    def release(self, slot: int) -> None:
        check_slot(slot, self.max_batch)
        self._past.pop(slot, None)  # frees the slot's cache now rather than at its next prefill
