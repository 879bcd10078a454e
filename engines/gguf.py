"""GGUF models with llama.cpp (llama-cpp-python): the chat template from the GGUF metadata,
continuous batching of several sequences per model (``llama_batch.py``), every layer on the
GPU when llama.cpp was built with CUDA (or Metal) and one is present. Encoder models (BERT and
friends) give embeddings through ``llama_cpp.Llama``."""

from __future__ import annotations

import logging
import os
import re
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
from .batching import PieceDecoder, SequenceStream
from .batching import Sequence as BatchSequence
from .grammar import GrammarCompiler
from .llama_batch import PROMPT_CHUNK, LlamaBatchRunner, piece
from .logit_rules import LogitRules
from .prompt_tokens import SpecialTokens, refuse_if_too_long, render_chat
from .textgen import FALLBACK_CHAT_TEMPLATE, with_tools

# Architectures llama.cpp runs as encoders: they give embeddings, not text.
ENCODER_ARCHITECTURES = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                         "t5encoder", "modern-bert", "neo-bert"}
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
MAX_PARALLEL = 64
KV_CACHE_ELEMENT_BYTES = 2  # llama.cpp's default KV cache type, f16

# llama.cpp logs through llama-cpp-python's logger; only its errors belong in llmlb's log.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def kv_bytes_per_token(fields, arch: str) -> int | None:  # noqa: ANN001 - GGUFReader fields
    """The KV cache one token takes in llama.cpp (f16 keys and values, every layer), from the
    GGUF metadata; None when the metadata does not say (an encoder, an unknown layout)."""
    def value(name: str):  # noqa: ANN202 - an int, or a list of ints (one per layer)
        found = fields.get(f"{arch}.{name}")
        return found.contents() if found is not None else None

    try:
        layers = int(value("block_count") or 0)
        heads = value("attention.head_count")
        kv_heads = value("attention.head_count_kv")
        width = int(value("embedding_length") or 0)
        if not layers or heads is None:
            return None
        heads_of = heads if isinstance(heads, list) else [heads] * layers
        kv_of = kv_heads if isinstance(kv_heads, list) else [kv_heads or 0] * layers
        total = 0
        for n_head, n_kv in zip(heads_of, kv_of, strict=False):
            n_kv = n_kv or n_head  # absent: one KV head per query head
            head = width // n_head if n_head else 0
            key = int(value("attention.key_length") or head)
            val = int(value("attention.value_length") or head)
            total += int(n_kv) * (key + val)
        return total * KV_CACHE_ELEMENT_BYTES or None
    except (TypeError, ValueError):
        return None


def pick_main_file(artifacts: Sequence[Path]) -> Path:
    """The file to open: the first shard of a split model, never a projector (mmproj)."""
    candidates = [a for a in artifacts if "mmproj" not in a.name.lower()] or list(artifacts)
    shards = [a for a in candidates if _SPLIT.search(a.name)]
    if shards:
        return min(shards, key=lambda a: a.name)
    return max(candidates, key=lambda a: a.stat().st_size)


class _Vocab:
    """Tokenization with llama.cpp's vocabulary; user text never becomes control tokens."""

    def __init__(self, lib, model) -> None:  # noqa: ANN001 - llama_cpp objects
        self._lib, self._vocab = lib, model.vocab
        control = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_UNKNOWN
        tokens: dict[str, int] = {}
        lstrip, rstrip = [], []
        self.max_token_bytes = 1
        for token in range(lib.llama_vocab_n_tokens(self._vocab)):
            self.max_token_bytes = max(self.max_token_bytes,
                                       len(piece(lib, self._vocab, token, special=True)))
            attr = model.token_get_attr(token)
            if attr & control:
                text = model.token_get_text(token)
                tokens.setdefault(text, token)
                if attr & lib.LLAMA_TOKEN_ATTR_LSTRIP:
                    lstrip.append(text)
                if attr & lib.LLAMA_TOKEN_ATTR_RSTRIP:
                    rstrip.append(text)
        self.specials = SpecialTokens(tokens, lstrip, rstrip)
        self._bos = [lib.llama_vocab_bos(self._vocab)] if lib.llama_vocab_get_add_bos(
            self._vocab) else []
        self._eos = [lib.llama_vocab_eos(self._vocab)] if lib.llama_vocab_get_add_eos(
            self._vocab) else []

    def text(self, text: str) -> list[int]:
        """Plain text: control-token strings in it stay text (parse_special=False)."""
        data = text.encode("utf-8", errors="replace")  # a lone surrogate is not UTF-8
        size = len(data) + 8
        buffer = (self._lib.llama_token * size)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, size, False, False)
        if n < 0:
            size = -n
            buffer = (self._lib.llama_token * size)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, size, False,
                                         False)
        return list(buffer[:n])

    def prompt(self, text: str, spans: Sequence[tuple[int, int]],
               context_length: int) -> list[int]:
        """A rendered chat prompt: control tokens outside ``spans`` parsed, the rest text
        (what llama_tokenize with parse_special does, minus its quadratic cost)."""
        refuse_if_too_long(text, self.max_token_bytes, context_length)
        return self.specials.encode(text, spans, self.text, context_length)

    def user_text(self, text: str, context_length: int) -> list[int]:
        """A raw completion prompt: all of it text, with the model's BOS/EOS rules."""
        refuse_if_too_long(text, self.max_token_bytes, context_length)
        return [*self._bos, *self.text(text), *self._eos]


class GGUFChatModel(LoadedModel):
    capabilities = frozenset({CHAT, COMPLETION})

    def __init__(self, lib, model, context, slots: int,  # noqa: ANN001 - llama_cpp objects
                 context_length: int, unified: bool = True, gpu: bool = False) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._lib, self._model = lib, model
        self.context_length = context_length
        self.parallel = slots
        self._vocab = _Vocab(lib, model)
        self._runner = LlamaBatchRunner(lib, model, context, slots, unified, gpu)
        meta = model.metadata()
        eos, bos = model.token_eos(), model.token_bos()
        self._template = meta.get("tokenizer.chat_template") or FALLBACK_CHAT_TEMPLATE
        self._grammars = GrammarCompiler(self._llguidance_tokenizer)
        self._formatter = Jinja2ChatFormatter(
            template=self._template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )

    def _llguidance_tokenizer(self):  # noqa: ANN202 - llguidance.LLTokenizer
        from llguidance.llamacpp import lltokenizer_from_vocab

        return lltokenizer_from_vocab(self._model.vocab)

    def prompt_ids(self, messages: list[dict], tools: Sequence[dict] = ()) -> list[int]:
        """The tokens ``chat`` feeds the model for these messages (and tools)."""
        messages = with_tools(messages, tools, self._template)
        try:
            prompt = render_chat(
                lambda m: self._formatter(messages=m, tools=list(tools) or None).prompt,
                messages, self._vocab.specials)
        except Exception as exc:  # template errors are about the request's messages
            raise InvalidPrompt(f"the chat template rejected the messages: {exc}") from exc
        # The template writes BOS itself (llama-cpp-python's formatter says added_special).
        return self._vocab.prompt(prompt.text, prompt.spans, self.context_length)

    def chat(self, messages: list[dict], params: SamplingParams) -> Iterator[GenerationEvent]:
        return self._start(self.prompt_ids(messages, params.tools), params)

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[GenerationEvent]:
        return self._start(self._vocab.user_text(prompt, self.context_length), params)

    def _start(self, ids: list[int], params: SamplingParams) -> Iterator[GenerationEvent]:
        budget = token_budget(len(ids), self.context_length, params.max_tokens)
        seq = BatchSequence(ids, params, budget)
        if LogitRules.needed(params):
            LogitRules.check_vocabulary(params, self._lib.llama_vocab_n_tokens(self._model.vocab))
            constraint = None if params.json_schema is None else \
                self._grammars.matcher(params.json_schema)
            seq.rules = LogitRules(params, ids, constraint)
        self._runner.submit(seq)
        vocab = self._model.vocab
        decoder = PieceDecoder(lambda token: piece(self._lib, vocab, token))
        return SequenceStream(seq, decoder, self._runner.wake,
                              lambda token: piece(self._lib, vocab, token, special=True))

    def unload(self) -> None:
        self._runner.close()
        self._model.close()


class GGUFEmbeddingModel(LoadedModel):
    capabilities = frozenset({EMBEDDINGS})

    def __init__(self, llm) -> None:  # noqa: ANN001 - llama_cpp.Llama
        self._llm = llm
        self.context_length = llm.n_ctx()

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        return compute.call(self._llm.embed, list(texts), normalize=True, return_count=True)

    def unload(self) -> None:
        self._llm.close()


class GGUFEngine(Engine):
    name = "llama.cpp"
    formats = {"gguf": (".gguf",)}
    parallel_from_memory = True

    @property
    def parameters(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset(OPTIONAL_PARAMETERS) - (frozenset() if grammar.available()
                                                 else grammar.GRAMMAR_PARAMETERS)

    def availability(self) -> Availability:
        try:
            import gguf  # noqa: F401 - reads the metadata
            import llama_cpp
        except ImportError as exc:
            return Availability(False, f"{exc.name} is not installed "
                                       "(pip install 'llmlb[gguf]')")
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        return Availability(True, device="gpu" if gpu else "cpu")

    def parallel(self, options: LoadOptions) -> int:
        if options.parallel_sequences is not None:
            return max(1, min(options.parallel_sequences, MAX_PARALLEL))
        return AUTO_PARALLEL_MAX  # each model gets what its KV cache leaves room for

    def load(self, model_dir: Path, artifacts: Sequence[Path],
             options: LoadOptions = LoadOptions()) -> LoadedModel:  # noqa: B008
        return compute.call(self._load, artifacts, options)

    def _load(self, artifacts: Sequence[Path], options: LoadOptions) -> LoadedModel:
        import llama_cpp

        path = str(pick_main_file(artifacts))
        try:
            # The metadata (architecture, training context) sizes the context before any KV
            # cache is allocated; the gguf package reads it without loading the weights.
            from gguf import GGUFReader

            fields = GGUFReader(path).fields
            arch = str(fields["general.architecture"].contents())
            trained_field = fields.get(f"{arch}.context_length")
            trained = int(trained_field.contents()) if trained_field else options.context_length
        except (KeyError, ValueError, OSError) as exc:
            raise EngineError(f"{Path(path).name} is not a readable GGUF file: {exc}") from exc
        context_length = min(trained, options.context_length)
        per_token = kv_bytes_per_token(fields, arch)
        per_sequence = per_token * context_length if per_token else None
        weights = sum(a.stat().st_size for a in artifacts)
        slots = choose_parallel(options, weights, per_sequence, MAX_PARALLEL)
        gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        try:
            if arch in ENCODER_ARCHITECTURES:
                llm = llama_cpp.Llama(model_path=path, n_ctx=context_length,
                                      n_gpu_layers=gpu_layers, n_threads=os.cpu_count() or 1,
                                      embedding=True, verbose=False)
                return GGUFEmbeddingModel(llm)
            model = self._load_generator(llama_cpp, path, gpu_layers, context_length, slots,
                                         trained)
            model.kv_cache_bytes = per_sequence * slots if per_sequence else None
            return model
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(f"llama.cpp could not load {Path(path).name}: {exc}") from exc

    def _load_generator(self, lib, path: str, gpu_layers: int, context_length: int,  # noqa: ANN001
                        slots: int, trained: int) -> GGUFChatModel:
        from llama_cpp import _internals

        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = gpu_layers
        # verbose=False would silence the load by redirecting the process's stdout/stderr,
        # which other threads share; the log level set above filters llama.cpp's log instead.
        model = _internals.LlamaModel(path_model=path, params=model_params, verbose=True)
        params = lib.llama_context_default_params()
        # Room for every slot's full context: each sequence may use context_length tokens
        # (LLMLB_CONTEXT_LENGTH, or the model's training context when smaller). One unified
        # cache stores prefixes shared between slots once; llama.cpp then counts the whole
        # cache as one sequence's context, so where the slots together outgrow the training
        # context each slot gets a stream of its own, exactly context_length long, and
        # llama.cpp sees the limit llmlb enforces (nothing to warn about). Either way the
        # cache holds slots x context_length cells: what choose_parallel counted.
        unified = context_length * slots <= trained
        params.n_ctx = context_length * slots
        params.n_batch = params.n_ubatch = PROMPT_CHUNK
        params.n_seq_max = slots
        params.kv_unified = unified
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        # As llama_cpp.Llama: flash attention's results depend on the batch's shape, and a
        # sequence must read the same alone as in a batch.
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        try:
            context = _internals.LlamaContext(model=model, params=params, verbose=False)
        except BaseException:
            model.close()
            raise
        return GGUFChatModel(lib, model, context, slots, context_length, unified,
                             gpu_layers != 0)
