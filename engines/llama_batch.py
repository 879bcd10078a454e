"""Continuous batching for llama.cpp through llama-cpp-python's low-level API.

One ``LlamaBatchRunner`` per loaded GGUF model owns a llama.cpp context with a KV cache of
``slots × context_length`` cells, one llama.cpp sequence id per slot: unified, or one stream
per slot where the slots together outgrow the model's training context (``gguf.py``). Each
step on the compute thread (``engines/compute.py``):

1. drops cancelled sequences (their slot is free at once) and admits waiting ones;
2. builds one batch: the last sampled token of every decoding sequence, then prompt tokens
   of sequences still reading their prompt, first come first served, up to a chunk
   (chunked prefill: see ``prompt_chunk``);
3. runs ``llama_decode`` once and samples each sequence's next token with its own sampler
   chain (``llama_sampling.build_sampler``: its own seed, temperature, top-p) after its own
   logit rules (``logit_rules``: penalties, logit bias, JSON-schema grammar, logprobs).

A slot keeps the KV of its last sequence after it ends; a new prompt takes the free slot that
shares the longest prefix with it, or copies a longer shared prefix from another slot
(``llama_memory_seq_cp`` shares cells in a unified cache; streams can copy only whole
caches, so a slot of its own stream reuses only its own prefix), and computes only the rest.
Every sequence stays within ``context_length`` tokens, so the cache never runs out.
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque
from dataclasses import dataclass, field

from . import compute
from .base import EngineError
from .batching import Sequence
from .llama_sampling import build_sampler
from .logit_rules import Logprobs

log = logging.getLogger(__name__)

#: tokens one step reads: llama.cpp's default physical batch for a sequence alone; a quarter
#: of it while other sequences share the model or other models wait for the compute thread
#: (``prompt_chunk``)
PROMPT_CHUNK = 512
SHARED_PROMPT_CHUNK = 128
#: a prefix in another slot is copied when it saves at least this many tokens of prompt
MIN_COPY_GAIN = 16


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this slot holds
    seq: Sequence | None = None
    pending: list[int] = field(default_factory=list)  # tokens to read before sampling
    sampler: object | None = None
    last_used: int = 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaBatchRunner(compute.Runner):
    def __init__(self, lib, model, context, slots: int,  # noqa: ANN001 - llama_cpp objects
                 unified: bool = True, gpu: bool = False) -> None:
        self._lib, self._model, self._ctx = lib, model, context
        # On a GPU a step's fixed cost is worth hundreds of prompt tokens: prompts with
        # company keep the whole physical batch there.
        self._busy_chunk = PROMPT_CHUNK if gpu else SHARED_PROMPT_CHUNK
        self._mem = lib.llama_get_memory(context.ctx)
        self._n_vocab = lib.llama_vocab_n_tokens(model.vocab)
        self._batch = lib.llama_batch_init(PROMPT_CHUNK, 0, 1)
        self._slots = [_Slot(i) for i in range(slots)]
        self._waiting: deque[Sequence] = deque()  # appended by request threads
        self._clock = 0
        # Recurrent and sliding-window caches cannot cut or share a prefix reliably; separate
        # streams cannot share part of one.
        self._share = unified and not (lib.llama_model_is_recurrent(model.model)
                           or lib.llama_model_is_hybrid(model.model)
                           or lib.llama_model_n_swa(model.model) > 0)
        self._closed = False

    # --- the request's side ---------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        self._waiting.append(seq)
        self.wake()

    def active(self) -> int:
        return sum(1 for s in self._slots if s.seq is not None)

    # --- the compute thread ---------------------------------------------------------------

    def step(self) -> bool:
        if self._closed:
            return False
        self._drop_cancelled()
        self._admit()
        live = [s for s in self._slots if s.seq is not None]
        if not live:
            return bool(self._waiting)
        rows = self._fill_batch(live)
        status = self._lib.llama_decode(self._ctx.ctx, self._batch)
        if status != 0:
            self._fail(live, EngineError(f"llama.cpp could not decode the batch "
                                         f"(status {status})"))
            return bool(self._waiting)
        for slot, fed, row in rows:
            slot.cached.extend(fed)
            if row is not None:
                self._sample(slot, row)
        return any(s.seq is not None for s in self._slots) or bool(self._waiting)

    def _drop_cancelled(self) -> None:
        for slot in self._slots:
            if slot.seq is not None and slot.seq.cancelled:
                self._release(slot)
        if any(seq.cancelled for seq in self._waiting):
            self._waiting = deque(seq for seq in self._waiting if not seq.cancelled)

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s in self._slots if s.seq is None]
            if not free:
                return
            seq = self._waiting.popleft()
            if seq.cancelled:
                continue
            # Keep at least the last prompt token to read: its logits give the first token.
            usable = seq.prompt[:-1]
            slot = max(free, key=lambda s: (_common_prefix(s.cached, usable), -s.last_used))
            keep = _common_prefix(slot.cached, usable)
            if self._share:
                donor = max(self._slots, key=lambda s: _common_prefix(s.cached, usable))
                shared = _common_prefix(donor.cached, usable)
                if donor is not slot and shared >= keep + MIN_COPY_GAIN:
                    self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                    self._lib.llama_memory_seq_cp(self._mem, donor.seq_id, slot.seq_id, 0, shared)
                    slot.cached = usable[:shared]
                    keep = shared
            if keep < len(slot.cached):
                if not self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
                    self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                    keep = 0
                del slot.cached[keep:]
            slot.seq, slot.pending = seq, seq.prompt[keep:]
            slot.sampler = build_sampler(self._lib, seq.params)
            self._clock += 1
            slot.last_used = self._clock

    def prompt_chunk(self, live: list[_Slot]) -> int:
        """Tokens the next step reads, decoding ones included. A prompt alone is read in
        llama.cpp's physical batches. With company it is read in pieces inside the decoding
        batch (chunked prefill, as vLLM and llama.cpp's server do): each step then costs the
        decoding sequences a piece of prompt, not a whole one; and prompts that arrive
        together are read first come first served, a few per step, so the first ones answer
        after a step or two instead of all after the whole crowd's prompts (time to first
        token under load, bench/batching.py). On a CPU a step's fixed cost (reading the
        weights) is worth some tens of prompt tokens; a quarter of the physical batch keeps it
        small against the prompt work of a step (on a GPU it is worth hundreds: the whole
        batch stays). Other models waiting for the compute thread get the quarter too."""
        if compute.contended():
            return SHARED_PROMPT_CHUNK
        if len(live) > 1 or self._waiting:
            return self._busy_chunk
        return PROMPT_CHUNK

    def _fill_batch(self, live: list[_Slot]) -> list[tuple[_Slot, list[int], int | None]]:
        """Fill the llama_batch; per slot the tokens fed and the row whose logits to sample."""
        batch = self._batch
        batch.n_tokens = 0
        rows: list[tuple[_Slot, list[int], int | None]] = []
        decoding = [s for s in live if s.seq.produced > 0 or len(s.pending) == 1]
        # first come, first served: the order the slots were taken in
        reading = sorted((s for s in live if s not in decoding), key=lambda s: s.last_used)
        budget = max(self.prompt_chunk(live) - len(decoding), 1)
        for slot in decoding + reading:
            take = slot.pending if slot in decoding else slot.pending[:budget]
            if not take:
                continue
            if slot in reading:
                budget -= len(take)
            base = len(slot.cached)
            last = len(take) == len(slot.pending)  # the prompt (or token) is complete
            for i, token in enumerate(take):
                n = batch.n_tokens
                batch.token[n] = token
                batch.pos[n] = base + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = int(last and i == len(take) - 1)
                batch.n_tokens = n + 1
            rows.append((slot, take, batch.n_tokens - 1 if last else None))
            slot.pending = slot.pending[len(take):]
            if budget <= 0 and slot in reading:
                break
        return rows

    def _sample(self, slot: _Slot, row: int) -> None:
        seq = slot.seq
        rules, logprobs = seq.rules, None
        if rules is not None:
            # llama.cpp's own logits buffer: the rules change it in place, and the sampler
            # chain reads it next
            import numpy as np

            logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx.ctx, row),
                                           shape=(self._n_vocab,))
            if rules.top_logprobs is not None:
                logprobs = Logprobs(logits, rules.top_logprobs)
            rules.apply(logits)
        token = self._lib.llama_sampler_sample(slot.sampler, self._ctx.ctx, row)
        if self._lib.llama_vocab_is_eog(self._model.vocab, token):
            seq.finish("stop")
            self._release(slot)
            return
        if rules is not None:
            rules.accept(token)
        if seq.push(token, logprobs.of(token) if logprobs is not None else None):
            seq.finish("length")
            self._release(slot)
        else:
            slot.pending = [token]

    def _release(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            self._lib.llama_sampler_free(slot.sampler)
        slot.seq, slot.sampler, slot.pending = None, None, []

    def _fail(self, slots: list[_Slot], exc: EngineError) -> None:
        log.error("%s", exc)
        for slot in slots:
            slot.seq.fail(exc)
            self._release(slot)
            self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.cached = []

    def abort(self, exc: BaseException) -> None:
        self._end_all(EngineError(f"generation failed: {exc}"))
        self._lib.llama_memory_clear(self._mem, True)
        for slot in self._slots:
            slot.cached = []

    def _end_all(self, exc: EngineError) -> None:
        for slot in self._slots:
            if slot.seq is not None:
                slot.seq.fail(exc)
                self._release(slot)
        while self._waiting:
            self._waiting.popleft().fail(exc)

    def close(self) -> None:
        """Free the context (on the compute thread); sequences still here get an error."""
        if self._closed:
            return
        self._closed = True
        self._end_all(EngineError("the model was unloaded"))
        self._lib.llama_batch_free(self._batch)
        self._ctx.close()


def piece(lib, vocab, token: int, special: bool = False) -> bytes:  # noqa: ANN001
    """The bytes of one token, as llama.cpp detokenizes (control tokens as '' unless
    ``special``)."""
    buffer = ctypes.create_string_buffer(64)
    n = lib.llama_token_to_piece(vocab, token, buffer, 64, 0, special)
    if n < 0:
        buffer = ctypes.create_string_buffer(-n)
        n = lib.llama_token_to_piece(vocab, token, buffer, -n, 0, special)
    return buffer.raw[:n]
