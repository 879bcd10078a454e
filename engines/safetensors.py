"""safetensors models with transformers + torch: CUDA and half precision when a GPU is there,
float32 on the CPU otherwise. Causal LMs generate with transformers' continuous batching,
stepped on the compute thread (``transformers_batch.py``), or one sequence at a time when it
is unavailable (the log says why); encoder models (BERT and friends) give mean-pooled
embeddings."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import compute, grammar
from .base import (
    AUTO_PARALLEL_MAX,
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    OPTIONAL_PARAMETERS,
    Availability,
    Engine,
    EngineError,
    GenerationEvent,
    InvalidPrompt,
    LoadedModel,
    LoadOptions,
    SamplingParams,
    choose_parallel,
    token_budget,
)
from .batching import Sequence as BatchSequence
from .batching import SequenceStream
from .grammar import GrammarCompiler
from .logit_rules import LogitRules
from .prompt_tokens import (
    SpecialTokens,
    hf_max_token_bytes,
    hf_special_tokens,
    hf_text_tokenizer,
    refuse_if_too_long,
    render_chat,
)
from .textgen import FALLBACK_CHAT_TEMPLATE, IncrementalDecoder, read_json, with_tools
from .transformers_batch import ContinuousBatchRunner, SerialRunner

log = logging.getLogger(__name__)

GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
MAX_PARALLEL = 64


def kv_bytes_per_token(config: dict, element_bytes: int) -> int | None:
    """The KV cache one token takes (keys and values, every layer), from config.json; None
    when it does not say."""
    try:
        layers = int(config.get("num_hidden_layers") or 0)
        heads = int(config.get("num_attention_heads") or 0)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head = int(config.get("head_dim") or (int(config.get("hidden_size") or 0) // heads
                                             if heads else 0))
    except (TypeError, ValueError):
        return None
    return layers * kv_heads * head * 2 * element_bytes or None


def _device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def _eos_ids(model, tokenizer) -> set[int]:  # noqa: ANN001
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


class _Tokens:
    """Tokenization with the model's tokenizer; user text never becomes control tokens."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - a transformers tokenizer
        self._tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)  # None: a Python tokenizer
        self.specials = hf_special_tokens(backend) if backend is not None else SpecialTokens(
            {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special})
        self._backend = backend
        self._text = hf_text_tokenizer(backend) if backend is not None else None
        self.max_token_bytes = hf_max_token_bytes(backend) if backend is not None else max(
            (len(t.encode("utf-8")) for t in tokenizer.get_vocab()), default=1)

    def encode_text(self, text: str, add_special: bool = False) -> list[int]:
        if self._text is not None:
            return self._text.encode(text, add_special_tokens=add_special).ids
        return list(self._tok(text, add_special_tokens=add_special,
                              split_special_tokens=True)["input_ids"])

    def prompt(self, text: str, spans: Sequence[tuple[int, int]],
               context_length: int) -> list[int]:
        refuse_if_too_long(text, self.max_token_bytes, context_length)
        if not spans:  # nothing to protect: the library's own tokenization, exactly
            if self._backend is not None:  # (the wrapper would warn about long prompts)
                return self._backend.encode(text, add_special_tokens=False).ids
            return list(self._tok(text, add_special_tokens=False)["input_ids"])
        return self.specials.encode(text, spans, self.encode_text, context_length)


class CausalLM(LoadedModel):
    capabilities = frozenset({CHAT, COMPLETION})

    def __init__(self, model, tokenizer, device: str, context_length: int,  # noqa: ANN001
                 slots: int) -> None:
        self._model, self._tok, self._device = model, tokenizer, device
        self.context_length = context_length
        self._tokens = _Tokens(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        eos = _eos_ids(model, tokenizer)
        runner, why = (None, "LLMLB_PARALLEL_SEQUENCES is 1") if slots == 1 else \
            ContinuousBatchRunner.create(model, slots, context_length, eos)
        if runner is None:
            if slots > 1:
                log.warning("Generating one sequence at a time: %s", why)
            runner = SerialRunner(model, device, eos)
        self._runner = runner
        self.parallel = slots if isinstance(runner, ContinuousBatchRunner) else 1
        self._grammars = GrammarCompiler(self._llguidance_tokenizer)

    def _llguidance_tokenizer(self):  # noqa: ANN202 - llguidance.LLTokenizer
        from llguidance.hf import from_tokenizer

        return from_tokenizer(self._tok)

    def prompt_ids(self, messages: list[dict], tools: Sequence[dict] = ()) -> list[int]:
        """The tokens ``chat`` feeds the model for these messages (and tools)."""
        messages = with_tools(messages, tools, str(self._tok.chat_template))

        def render(msgs: list[dict]) -> str:
            return self._tok.apply_chat_template(msgs, tools=list(tools) or None,
                                                 tokenize=False, add_generation_prompt=True)
        try:
            prompt = render_chat(render, messages, self._tokens.specials)
        except Exception as exc:
            raise InvalidPrompt(f"the chat template rejected the messages: {exc}") from exc
        return self._tokens.prompt(prompt.text, prompt.spans, self.context_length)

    def chat(self, messages: list[dict], params: SamplingParams) -> Iterator[GenerationEvent]:
        return self._start(self.prompt_ids(messages, params.tools), params)

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[GenerationEvent]:
        refuse_if_too_long(prompt, self._tokens.max_token_bytes, self.context_length)
        return self._start(self._tokens.encode_text(prompt, add_special=True), params)

    def _start(self, ids: list[int], params: SamplingParams) -> Iterator[GenerationEvent]:
        budget = token_budget(len(ids), self.context_length, params.max_tokens)
        seq = BatchSequence(ids, params, budget)
        if LogitRules.needed(params):
            LogitRules.check_vocabulary(params, len(self._tok))
            constraint = None if params.json_schema is None else \
                self._grammars.matcher(params.json_schema)
            seq.rules = LogitRules(params, ids, constraint)
        self._runner.submit(seq)
        decoder = IncrementalDecoder(lambda i: self._tok.decode(i, skip_special_tokens=True))
        return SequenceStream(seq, decoder, self._runner.wake, self._token_bytes)

    def _token_bytes(self, token: int) -> bytes:
        """One token's text for logprobs (a byte-level piece of a character decodes to
        U+FFFD, as the tokenizer's own decode gives it)."""
        return self._tok.decode([token], skip_special_tokens=False).encode("utf-8")

    def unload(self) -> None:
        self._runner.close()
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
    parallel_from_memory = True

    @property
    def parameters(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset(OPTIONAL_PARAMETERS) - (frozenset() if grammar.available()
                                                 else grammar.GRAMMAR_PARAMETERS)

    def availability(self) -> Availability:
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"{exc.name} is not installed "
                                       "(pip install 'llmlb[transformers]')")
        return Availability(True, device="cuda" if torch.cuda.is_available() else "cpu")

    def parallel(self, options: LoadOptions) -> int:
        from transformers import GenerationMixin

        if not hasattr(GenerationMixin, "init_continuous_batching"):
            return 1
        if options.parallel_sequences is not None:
            return max(1, min(options.parallel_sequences, MAX_PARALLEL))
        return AUTO_PARALLEL_MAX  # each model gets what its KV cache leaves room for

    def load(self, model_dir: Path, artifacts: Sequence[Path],
             options: LoadOptions = LoadOptions()) -> LoadedModel:  # noqa: B008
        weights = sum(a.stat().st_size for a in artifacts)
        return compute.call(self._load, model_dir, options, weights)

    def _load(self, model_dir: Path, options: LoadOptions, weights: int) -> LoadedModel:
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
            per_token = kv_bytes_per_token(config, model.dtype.itemsize)
            per_sequence = per_token * context if per_token else None
            slots = min(choose_parallel(options, weights, per_sequence, MAX_PARALLEL),
                        self.parallel(options))
            loaded = CausalLM(model, tokenizer, device, context, slots)
            if per_sequence:
                loaded.kv_cache_bytes = per_sequence * loaded.parallel
            return loaded
        return Encoder(model, tokenizer, device, context)
