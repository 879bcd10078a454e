"""GGUF models with llama-cpp-python: the chat template from the GGUF metadata, every layer on
the GPU when llama.cpp was built with CUDA (or Metal) and one is present."""

from __future__ import annotations

import codecs
import os
import random
import re
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
from .textgen import FALLBACK_CHAT_TEMPLATE, plain_messages

# Architectures llama.cpp runs as encoders: they give embeddings, not text.
ENCODER_ARCHITECTURES = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                         "t5encoder", "modern-bert", "neo-bert"}
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def pick_main_file(artifacts: Sequence[Path]) -> Path:
    """The file to open: the first shard of a split model, never a projector (mmproj)."""
    candidates = [a for a in artifacts if "mmproj" not in a.name.lower()] or list(artifacts)
    shards = [a for a in candidates if _SPLIT.search(a.name)]
    if shards:
        return min(shards, key=lambda a: a.name)
    return max(candidates, key=lambda a: a.stat().st_size)


class GGUFModel(LoadedModel):
    def __init__(self, llm, embedding: bool) -> None:  # noqa: ANN001 - llama_cpp.Llama
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llm = llm
        self._lib = llama_cpp
        self.context_length = llm.n_ctx()
        if embedding:
            self.capabilities = frozenset({EMBEDDINGS})
            return
        self.capabilities = frozenset({CHAT, COMPLETION})
        meta = llm.metadata
        eos, bos = llm.token_eos(), llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=meta.get("tokenizer.chat_template") or FALLBACK_CHAT_TEMPLATE,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        )

    def _is_end(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._llm._model.vocab, token))

    def _generate(self, prompt_tokens: list[int], params: SamplingParams,
                  ) -> Iterator[GenerationEvent]:
        llm = self._llm
        max_tokens = token_budget(len(prompt_tokens), self.context_length, params.max_tokens)
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        yield Started(len(prompt_tokens))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reason = "length"
        # OpenAI semantics: temperature and top_p only (no top-k, min-p or penalties).
        tokens = llm.generate(prompt_tokens, temp=params.temperature, top_p=params.top_p,
                              top_k=0, min_p=0.0, repeat_penalty=1.0)
        for produced, token in enumerate(tokens, start=1):
            if self._is_end(token):
                reason = "stop"
                break
            yield TokenText(decoder.decode(llm.detokenize([token])))
            if produced >= max_tokens:
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            yield TokenText(tail, tokens=0)
        yield Finished(reason)

    def chat(self, messages: list[dict], params: SamplingParams) -> Iterator[GenerationEvent]:
        return compute.stream(lambda: self._chat(messages, params))

    def _chat(self, messages: list[dict], params: SamplingParams) -> Iterator[GenerationEvent]:
        try:
            formatted = self._formatter(messages=plain_messages(messages))
        except Exception as exc:  # template errors are about the request's messages
            raise InvalidPrompt(f"the chat template rejected the messages: {exc}") from exc
        tokens = self._llm.tokenize(formatted.prompt.encode("utf-8"),
                                    add_bos=not formatted.added_special, special=True)
        yield from self._generate(tokens, params)

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[GenerationEvent]:
        return compute.stream(lambda: self._generate(
            self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True), params))

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        return compute.call(self._llm.embed, list(texts), normalize=True, return_count=True)

    def unload(self) -> None:
        self._llm.close()


class GGUFEngine(Engine):
    name = "llama.cpp"
    formats = {"gguf": (".gguf",)}

    def availability(self) -> Availability:
        try:
            import gguf  # noqa: F401 - reads the metadata
            import llama_cpp
        except ImportError as exc:
            return Availability(False, f"{exc.name} is not installed "
                                       "(pip install 'llmlb[gguf]')")
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        return Availability(True, device="gpu" if gpu else "cpu")

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
        embedding = arch in ENCODER_ARCHITECTURES
        try:
            llm = llama_cpp.Llama(
                model_path=path,
                n_ctx=min(trained, options.context_length),
                n_gpu_layers=-1 if llama_cpp.llama_supports_gpu_offload() else 0,
                n_threads=os.cpu_count() or 1,
                embedding=embedding,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(f"llama.cpp could not load {Path(path).name}: {exc}") from exc
        return GGUFModel(llm, embedding)
