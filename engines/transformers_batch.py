"""Generation runners for transformers models, both stepped on the compute thread.

* ``ContinuousBatchRunner``: transformers' continuous batching (a paged KV cache with prefix
  sharing, requests joining and leaving between steps, long prompts read in chunks). Its
  manager normally runs its own thread; llmlb drives its batch processor one step at a time
  from the compute thread instead (``prepare_next_batch`` / ``_generation_step`` /
  ``update_batch``), and replaces its sampling so that every sequence samples with its own
  temperature, top-p and seed. These are transformers internals: ``create`` checks them with
  a one-token run against a plain forward pass and returns None with the reason when they
  do not behave, and the engine falls back to serial generation.
* ``SerialRunner``: one sequence at a time with a dynamic cache, the prompt in chunks.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import random
from collections import deque

from . import compute
from .base import EngineError, SamplingParams
from .batching import Sequence
from .logit_rules import LogitRules, Logprobs, RawLogprob

log = logging.getLogger(__name__)

#: prompt tokens per step: for a sequence alone; with company (chunked prefill inside the
#: decoding batch, first come first served: the first of several prompts that arrive together
#: answers after a step or two, not after all of them, and decoding sequences wait for a
#: piece of prompt, not a whole one); while other models wait for the compute thread
PROMPT_CHUNK = 256
BUSY_PROMPT_CHUNK = 128
SHARED_PROMPT_CHUNK = 64
PAGE_SIZE = 64  # tokens per KV page: the granularity of prefix sharing


class TorchSampler:
    """One sequence's sampling: its logit rules first (``logit_rules``: logprobs, penalties,
    bias, grammar), then greedy at temperature 0, else top-k, temperature, the top-p nucleus,
    min-p, and a draw from the sequence's own generator (its seed)."""

    def __init__(self, params: SamplingParams, device, rules: LogitRules | None = None,  # noqa: ANN001 - torch device
                 eos: frozenset[int] = frozenset()) -> None:
        import torch

        self._torch = torch
        self.greedy = params.temperature <= 0
        self._temperature, self._top_p = params.temperature, params.top_p
        self._top_k, self._min_p = params.top_k, params.min_p
        self._rules, self._eos = rules, eos
        #: greedy with no rules: the batch's own argmax is this sequence's token
        self.plain = self.greedy and rules is None
        self._logprobs: deque[RawLogprob | None] = deque()  # of tokens not yet delivered
        self._generator = None
        if not self.greedy:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(params.seed if params.seed is not None
                                        else random.getrandbits(63))

    def sample(self, logits) -> int:  # noqa: ANN001 - 1-D float tensor
        rules, table = self._rules, None
        if rules is not None:
            # a float32 copy, changed in place below (the model's own may be an inference
            # tensor, or half precision)
            logits = logits.to(dtype=self._torch.float32, copy=True)
            if rules.top_logprobs is not None:
                table = Logprobs(logits, rules.top_logprobs)
            rules.apply(logits)
        token = self._pick(logits)
        if rules is not None and token not in self._eos:
            rules.accept(token)
            self._logprobs.append(table.of(token) if table is not None else None)
        return token

    def _pick(self, logits) -> int:  # noqa: ANN001
        torch = self._torch
        if self.greedy:
            return int(torch.argmax(logits))
        logits = logits.float()
        if self._top_k > 0 and self._top_k < logits.shape[-1]:
            kth = torch.topk(logits, self._top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        probs = torch.softmax(logits / self._temperature, dim=-1)
        if self._top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True)
            # Keep the smallest set whose mass reaches top_p (the token crossing it included).
            drop = (torch.cumsum(ordered, dim=-1) - ordered) >= self._top_p
            ordered[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        if self._min_p > 0:
            probs = probs.masked_fill(probs < self._min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def delivered(self) -> RawLogprob | None:
        """The logprobs of the oldest sampled token not yet handed to its sequence."""
        return self._logprobs.popleft() if self._logprobs else None


def _cache_keyword(model) -> str:  # noqa: ANN001
    """transformers 5.24 names the cache argument ``cache``; older ones ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class SerialRunner(compute.Runner):
    """One sequence at a time (llmlb's model pool sends one call at a time)."""

    def __init__(self, model, device: str, eos: set[int]) -> None:  # noqa: ANN001
        self._model, self._device, self._eos = model, device, eos
        self._cache_kw = _cache_keyword(model)
        self._waiting: deque[Sequence] = deque()
        self._seq: Sequence | None = None

    def submit(self, seq: Sequence) -> None:
        self._waiting.append(seq)
        self.wake()

    def step(self) -> bool:
        import torch
        from transformers import DynamicCache

        if self._seq is not None and self._seq.cancelled:
            self._seq = None
        while self._seq is None and self._waiting:
            seq = self._waiting.popleft()
            if not seq.cancelled:
                self._seq = seq
                self._cache, self._pending, self._fed = DynamicCache(), list(seq.prompt), 0
                self._sampler = TorchSampler(seq.params, self._device, seq.rules,
                                             frozenset(self._eos))
        if self._seq is None:
            return False
        seq = self._seq
        chunk = SHARED_PROMPT_CHUNK if compute.contended() else PROMPT_CHUNK
        take, self._pending = self._pending[:chunk], self._pending[chunk:]
        try:
            with torch.inference_mode():
                out = self._model(input_ids=torch.tensor([take], device=self._device),
                                  position_ids=torch.arange(self._fed, self._fed + len(take),
                                                            device=self._device)[None, :],
                                  use_cache=True, **{self._cache_kw: self._cache})
            self._fed += len(take)
            if not self._pending:
                token = self._sampler.sample(out.logits[0, -1])
                self._emit(seq, token)
        except Exception as exc:
            seq.fail(EngineError(f"generation failed: {exc}"))
            self._seq = None
        return self._seq is not None or bool(self._waiting)

    def _emit(self, seq: Sequence, token: int) -> None:
        if token in self._eos:
            seq.finish("stop")
            self._seq = None
        elif seq.push(token, self._sampler.delivered()):
            seq.finish("length")
            self._seq = None
        else:
            self._pending = [token]

    def abort(self, exc: BaseException) -> None:
        self._end_all(EngineError(f"generation failed: {exc}"))

    def close(self) -> None:
        self._end_all(EngineError("the model was unloaded"))

    def _end_all(self, exc: EngineError) -> None:
        for seq in [self._seq, *self._waiting]:
            if seq is not None:
                seq.fail(exc)
        self._seq = None
        self._waiting.clear()


class ContinuousBatchRunner(compute.Runner):
    def __init__(self, model, manager, processor, eos: set[int]) -> None:  # noqa: ANN001
        self._model, self._manager, self._bp = model, manager, processor
        self._eos = eos
        self._seqs: dict[str, tuple[Sequence, TorchSampler]] = {}
        self._sent: dict[str, int] = {}
        self._ids = itertools.count()
        self._device = model.device
        self._closed = False
        processor.model_runner._sample = self._sample  # per-sequence sampling (see above)

    @classmethod
    def create(cls, model, slots: int, context_length: int, eos: set[int],  # noqa: ANN001
               ) -> tuple[ContinuousBatchRunner | None, str]:
        """A runner, or None and why continuous batching is not used for this model."""
        if not hasattr(model, "init_continuous_batching"):
            return None, "the installed transformers has no continuous batching"
        try:
            from transformers import GenerationConfig
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            pages_per_seq = -(-context_length // PAGE_SIZE) + 1
            config = ContinuousBatchingConfig(
                page_size=PAGE_SIZE, num_blocks=slots * pages_per_seq,
                max_batch_tokens=PROMPT_CHUNK, max_requests_per_batch=slots,
                use_async_batching=False, use_cuda_graph=False, allow_block_sharing=True,
                auto_switch_to_flash=False, scheduler_type="fifo")
            generation = GenerationConfig(do_sample=False, eos_token_id=sorted(eos) or -1,
                                          max_new_tokens=context_length)
            manager = model.init_continuous_batching(generation_config=generation,
                                                     continuous_batching_config=config)
            processor = manager._create_batch_processor()
            manager.batch_processor = processor
            runner = cls(model, manager, processor, eos)
            problem = runner._self_check()
        except Exception as exc:  # internals that moved: serial generation still works
            return None, f"transformers' continuous batching failed its check: {exc!r}"
        if problem:
            return None, problem
        return runner, ""

    def _self_check(self) -> str:
        """One greedy token through the batch processor must match a plain forward pass."""
        import torch

        prompt = [int(t) for t in range(1, 9)]
        seq = Sequence(prompt, SamplingParams(max_tokens=1, temperature=0.0), 1)
        self.submit(seq, wake=False)
        for _ in range(8):
            if not self.step() or seq.has_news():
                break
        if not seq.has_news():
            return "a check request produced no token"
        kind, value = seq.next_item()
        if kind == 0:
            value = value[0]  # (token, logprobs)
        with torch.inference_mode():
            logits = self._model(input_ids=torch.tensor([prompt], device=self._device)).logits
        expected = int(torch.argmax(logits[0, -1]))
        if (kind, value) != (0, expected) and not (value == "stop" and expected in self._eos):
            return f"a check token differs from a plain forward pass ({value} != {expected})"
        return ""

    def submit(self, seq: Sequence, wake: bool = True) -> None:
        request_id = f"r{next(self._ids)}"
        self._seqs[request_id] = (seq, TorchSampler(seq.params, self._device, seq.rules,
                                                    frozenset(self._eos)))
        self._sent[request_id] = 0
        self._manager.add_request(list(seq.prompt), request_id=request_id,
                                  max_new_tokens=seq.max_new, streaming=True,
                                  eos_token_id=sorted(self._eos) or -1)
        if wake:
            self.wake()

    def step(self) -> bool:
        if self._closed:
            return False
        for request_id, (seq, _) in list(self._seqs.items()):
            if seq.cancelled:
                self._manager.cancel_request(request_id)
                self._forget(request_id)
        bp = self._bp
        bp.max_batch_tokens = (SHARED_PROMPT_CHUNK if compute.contended() else
                               BUSY_PROMPT_CHUNK if len(self._seqs) > 1 else PROMPT_CHUNK)
        import torch

        try:
            with torch.inference_mode():
                if not bp.prepare_next_batch():
                    return bool(self._seqs) and bp.has_pending_requests()
                bp._generation_step(self._model)
                bp.update_batch()
        except Exception as exc:
            log.exception("Continuous batching step failed")
            bp.fail_all_requests(exc)
        self._deliver()
        return bool(self._seqs)

    def _sample(self, scores, output_ids) -> None:  # noqa: ANN001 - torch tensors
        # Row i holds the logits of the i-th request of the batch that gets a token now (one
        # still reading its prompt gets none); rows past those are padding.
        io = self._bp.inputs_and_outputs
        states = [f.state for f in io.requests_in_batch if f.has_new_token]
        logits = scores[0]
        if logits.shape[0] < len(states):
            raise EngineError("continuous batching returned fewer logits than requests")
        tokens = logits.argmax(dim=-1)
        for row, state in enumerate(states):
            entry = self._seqs.get(state.request_id)
            if entry is not None and not entry[1].plain:
                tokens[row] = entry[1].sample(logits[row])
        output_ids[0, :tokens.shape[0]].copy_(tokens)

    def _deliver(self) -> None:
        outputs = self._manager.output_router.output_queue
        while not outputs.empty():
            out = outputs.get_nowait()
            entry = self._seqs.get(out.request_id)
            if entry is None:
                continue  # cancelled meanwhile
            seq, sampler = entry
            if out.error:
                seq.fail(EngineError(f"generation failed: {out.error}"))
                self._forget(out.request_id)
                continue
            new = out.generated_tokens[self._sent[out.request_id]:]
            self._sent[out.request_id] += len(new)
            for token in new:
                if token in self._eos:
                    seq.finish("stop")
                    self._forget(out.request_id)
                    break
                if seq.push(token, sampler.delivered()):
                    seq.finish("length")
                    self._forget(out.request_id)
                    break
            else:
                if out.is_finished():
                    seq.finish("length")
                    self._forget(out.request_id)

    def _forget(self, request_id: str) -> None:
        self._seqs.pop(request_id, None)
        self._sent.pop(request_id, None)

    def abort(self, exc: BaseException) -> None:
        error = EngineError(f"generation failed: {exc}")
        for seq, _ in list(self._seqs.values()):
            seq.fail(error)
        self._seqs.clear()
        self._sent.clear()
        self._bp.fail_all_requests(error)
        while not self._manager.output_router.output_queue.empty():
            self._manager.output_router.output_queue.get_nowait()

    def close(self) -> None:
        self.abort(EngineError("the model was unloaded"))
        self._closed = True
        self._manager.batch_processor = None
