"""safetensors models with transformers + torch: CUDA and half precision when a GPU is there,
float32 on the CPU otherwise. Causal LMs generate on the compute thread, whose streamer hands
tokens to the request through a queue; encoder models (BERT and friends) give mean-pooled
embeddings."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import compute
from .base import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    Availability,
    Engine,
    EngineError,
    Finished,
    GenerationEvent,
    InvalidPrompt,
    LoadedModel,
    LoadOptions,
    SamplingParams,
    Started,
    TokenText,
    token_budget,
)
from .textgen import FALLBACK_CHAT_TEMPLATE, IncrementalDecoder, plain_messages, read_json

GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_DONE = object()


def _device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def _eos_ids(model, tokenizer) -> set[int]:  # noqa: ANN001
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


class _TokenQueue:
    """A transformers streamer: generate() puts token tensors, the request thread reads ids."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self._skipped_prompt = False

    def put(self, value) -> None:  # noqa: ANN001 - torch tensor
        if not self._skipped_prompt:
            self._skipped_prompt = True  # the first call carries the prompt
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(token)

    def end(self) -> None:
        self.queue.put(_DONE)


class CausalLM(LoadedModel):
    capabilities = frozenset({CHAT, COMPLETION})

    def __init__(self, model, tokenizer, device: str, context_length: int) -> None:  # noqa: ANN001
        self._model, self._tok, self._device = model, tokenizer, device
        self.context_length = context_length
        self._eos = _eos_ids(model, tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE

    def _generate(self, input_ids: list[int], params: SamplingParams,
                  ) -> Iterator[GenerationEvent]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        max_new = token_budget(len(input_ids), self.context_length, params.max_tokens)
        cancelled = threading.Event()
        streamer = _TokenQueue()
        errors: list[BaseException] = []

        class _Cancelled(StoppingCriteria):
            def __call__(self, *_args, **_kwargs) -> bool:
                return cancelled.is_set()

        sampling = params.temperature > 0
        kwargs = dict(
            input_ids=torch.tensor([input_ids], device=self._device),
            attention_mask=torch.ones((1, len(input_ids)), dtype=torch.long,
                                      device=self._device),
            max_new_tokens=max_new, do_sample=sampling, streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled()]),
            pad_token_id=self._tok.pad_token_id if self._tok.pad_token_id is not None
            else next(iter(self._eos), 0),
        )
        if sampling:  # OpenAI semantics: temperature and top_p only
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0,
                          min_p=None, repetition_penalty=1.0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)

        def run() -> None:
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    self._model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the request thread
                errors.append(exc)
                streamer.end()

        yield Started(len(input_ids))
        # generate() runs on the process's compute thread (see engines/compute.py); its
        # streamer hands the tokens to this, the request's, thread.
        job = compute.submit(run)
        decoder = IncrementalDecoder(
            lambda ids: self._tok.decode(ids, skip_special_tokens=True))
        reason = "length"
        try:
            while True:
                token = streamer.queue.get()
                if token is _DONE:
                    break
                if token in self._eos:
                    reason = "stop"
                    break
                yield TokenText(decoder.push(token))
            tail = decoder.flush()
            if tail:
                yield TokenText(tail, tokens=0)
            if errors:
                raise EngineError(f"generation failed: {errors[0]}") from errors[0]
            yield Finished(reason)
        finally:
            cancelled.set()  # the client went away or we are done: stop generating early
            if not job.cancel():
                job.result()

    def chat(self, messages: list[dict], params: SamplingParams) -> Iterator[GenerationEvent]:
        try:
            prompt = self._tok.apply_chat_template(plain_messages(messages), tokenize=False,
                                                   add_generation_prompt=True)
        except Exception as exc:
            raise InvalidPrompt(f"the chat template rejected the messages: {exc}") from exc
        ids = self._tok(prompt, add_special_tokens=False)["input_ids"]
        return self._generate(list(ids), params)

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[GenerationEvent]:
        return self._generate(list(self._tok(prompt)["input_ids"]), params)

    def unload(self) -> None:
        del self._model


class Encoder(LoadedModel):
    capabilities = frozenset({EMBEDDINGS})

    def __init__(self, model, tokenizer, device: str, context_length: int) -> None:  # noqa: ANN001
        self._model, self._tok, self._device = model, tokenizer, device
        self.context_length = context_length

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        return compute.call(self._embed, texts)

    def _embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        import torch

        batch = self._tok(list(texts), padding=True, truncation=True,
                          max_length=self.context_length, return_tensors="pt").to(self._device)
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return pooled.cpu().tolist(), int(batch["attention_mask"].sum())

    def unload(self) -> None:
        del self._model


class SafetensorsEngine(Engine):
    name = "transformers"
    formats = {"safetensors": (".safetensors",)}

    def availability(self) -> Availability:
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"{exc.name} is not installed "
                                       "(pip install 'llmlb[transformers]')")
        return Availability(True, device="cuda" if torch.cuda.is_available() else "cpu")

    def load(self, model_dir: Path, artifacts: Sequence[Path],
             options: LoadOptions = LoadOptions()) -> LoadedModel:  # noqa: B008
        return compute.call(self._load, model_dir, options)

    def _load(self, model_dir: Path, options: LoadOptions) -> LoadedModel:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        config = read_json(model_dir / "config.json")
        if not config:
            raise EngineError("config.json is missing or unreadable next to the safetensors "
                              "files")
        architectures = config.get("architectures") or []
        generative = any(a.endswith(GENERATIVE_SUFFIXES) for a in architectures)
        device, dtype = _device_and_dtype()
        trained = int(config.get("max_position_embeddings") or options.context_length)
        context = min(trained, options.context_length)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            cls = AutoModelForCausalLM if generative else AutoModel
            model = cls.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise EngineError(f"transformers could not load the model: {exc}") from exc
        if generative:
            return CausalLM(model, tokenizer, device, context)
        return Encoder(model, tokenizer, device, context)
