"""ONNX models with onnxruntime (CUDA provider when a GPU is there, CPU otherwise).

Decoders in the layout Hugging Face's exports use (``onnx/model.onnx`` with ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.N.key/value`` inputs, ``logits`` and
``present.N.key/value`` outputs; ``config.json`` and ``tokenizer.json`` at the root) generate
with the KV cache; encoder exports (``last_hidden_state`` output) give embeddings.

Decoders run one sequence at a time (``parallel`` 1). Batching them would mean padding every
layer's past to a common length and re-padding the whole cache whenever a sequence joins or
leaves — a copy of the cache per join, with outputs that then depend on the batch's padding —
for exports that are mostly small models; they share the compute thread in steps instead
(the prompt in chunks, then one token per step).
"""

from __future__ import annotations

import random
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
    nvidia_driver_present,
    token_budget,
)
from .logit_rules import LogitRules, Logprobs, token_logprob
from .prompt_tokens import (
    hf_max_token_bytes,
    hf_special_tokens,
    hf_text_tokenizer,
    refuse_if_too_long,
    render_chat,
)
from .textgen import ChatTemplate, IncrementalDecoder, read_json, sample_next, token_text

#: prompt tokens per step, so that other models get their turn during a long prompt (fewer
#: while they wait for the compute thread)
PROMPT_CHUNK = 256
SHARED_PROMPT_CHUNK = 64

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}


def pick_graph(artifacts: Sequence[Path]) -> Path:
    """``model.onnx`` when present, else the only graph (e.g. ``model_q4f16.onnx``)."""
    for name in ("model.onnx", "decoder_model_merged.onnx"):
        for a in artifacts:
            if a.name == name:
                return a
    return sorted(artifacts, key=lambda a: (len(a.name), a.name))[0]


class _Tokenizer:
    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise EngineError("tokenizer.json is missing next to the ONNX model")
        self.tok = Tokenizer.from_file(str(path))
        self.config = read_json(model_dir / "tokenizer_config.json")
        self.specials = hf_special_tokens(self.tok)
        self._text = hf_text_tokenizer(self.tok)
        self.max_token_bytes = hf_max_token_bytes(self.tok)

    def encode_text(self, text: str, add_special: bool = False) -> list[int]:
        """Plain text: special-token strings in it stay text."""
        return self._text.encode(text, add_special_tokens=add_special).ids

    def encode_prompt(self, text: str, spans: Sequence[tuple[int, int]],
                      context_length: int) -> list[int]:
        """A rendered chat prompt: the template's special tokens parsed, user text as text.
        The template writes the special tokens itself; the tokenizer adds none."""
        refuse_if_too_long(text, self.max_token_bytes, context_length)
        if not spans:  # nothing to protect: the library's own tokenization, exactly
            return self.tok.encode(text, add_special_tokens=False).ids
        return self.specials.encode(text, spans, self.encode_text, context_length)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text) if text else None


class OnnxDecoder(LoadedModel):
    capabilities = frozenset({CHAT, COMPLETION})

    def __init__(self, session, model_dir: Path, options: LoadOptions) -> None:  # noqa: ANN001
        import numpy as np

        self._np = np
        self._session = session
        self._tok = _Tokenizer(model_dir)
        config = read_json(model_dir / "config.json")
        inputs = {i.name: i for i in session.get_inputs()}
        self._past_names = sorted((n for n in inputs if n.startswith("past_key_values.")),
                                  key=lambda n: (int(n.split(".")[1]), n))
        self._present_names = [n.replace("past_key_values.", "present.")
                               for n in self._past_names]
        self._has_positions = "position_ids" in inputs
        self._has_mask = "attention_mask" in inputs
        first = inputs[self._past_names[0]]
        self._past_dtype = np.dtype(_ORT_TYPES.get(first.type, "float32"))
        heads = first.shape[1] if isinstance(first.shape[1], int) else config.get(
            "num_key_value_heads", config.get("num_attention_heads"))
        head_dim = first.shape[3] if isinstance(first.shape[3], int) else config.get(
            "head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self._past_shape = (1, int(heads), 0, int(head_dim))
        trained = int(config.get("max_position_embeddings") or options.context_length)
        self.context_length = min(trained, options.context_length)
        tc = self._tok.config
        self._template = ChatTemplate(tc.get("chat_template"), token_text(tc.get("bos_token")),
                                      token_text(tc.get("eos_token")))
        gen = read_json(model_dir / "generation_config.json")
        eos = gen.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = eos if isinstance(eos, list) else [eos]
        eos_ids.append(self._tok.token_id(token_text(tc.get("eos_token"))))
        self._eos = {int(i) for i in eos_ids if i is not None}

    def _generate(self, ids: list[int], params: SamplingParams, max_new: int,
                  ) -> Iterator[GenerationEvent | None]:
        """On the compute thread; yields None between prompt chunks to let others step."""
        np = self._np
        rng = np.random.default_rng(params.seed if params.seed is not None
                                    else random.getrandbits(64))
        yield Started(len(ids))
        past = {n: np.zeros(self._past_shape, dtype=self._past_dtype) for n in self._past_names}
        pending = ids
        total = 0
        decoder = IncrementalDecoder(self._tok.decode)
        # penalties, logit bias, logprobs (no grammar: ONNX declares no tools/response_format)
        rules = LogitRules(params, ids) if LogitRules.needed(params) else None
        produced, reason = 0, "length"
        while produced < max_new:
            chunk = SHARED_PROMPT_CHUNK if compute.contended() else PROMPT_CHUNK
            step_ids, pending = pending[:chunk], pending[chunk:]
            feed = {"input_ids": np.array([step_ids], dtype=np.int64), **past}
            total += len(step_ids)
            if self._has_mask:
                feed["attention_mask"] = np.ones((1, total), dtype=np.int64)
            if self._has_positions:
                feed["position_ids"] = np.arange(total - len(step_ids), total,
                                                 dtype=np.int64)[None, :]
            outputs = self._session.run(["logits", *self._present_names], feed)
            past = dict(zip(self._past_names, outputs[1:], strict=True))
            if pending:
                yield None  # more of the prompt to read
                continue
            logits, table = outputs[0][0, -1], None
            if rules is not None:
                logits = logits.astype(np.float32)  # a copy the rules may change
                if params.top_logprobs is not None:
                    table = Logprobs(logits, params.top_logprobs)
                rules.apply(logits)
            token = sample_next(logits, params.temperature, params.top_p, rng)
            if token in self._eos:
                reason = "stop"
                break
            produced += 1
            if rules is not None:
                rules.accept(token)
            yield TokenText(decoder.push(token), logprob=None if table is None else
                            token_logprob(table.of(token), self._token_bytes))
            pending = [token]
        tail = decoder.flush()
        if tail:
            yield TokenText(tail, tokens=0)
        yield Finished(reason)

    def _token_bytes(self, token: int) -> bytes:
        return self._tok.tok.decode([token], skip_special_tokens=False).encode("utf-8")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The tokens ``chat`` feeds the model for these messages."""
        try:
            prompt = render_chat(self._template.render, messages, self._tok.specials)
        except Exception as exc:
            raise InvalidPrompt(f"the chat template rejected the messages: {exc}") from exc
        return self._tok.encode_prompt(prompt.text, prompt.spans, self.context_length)

    def chat(self, messages: list[dict], params: SamplingParams) -> Iterator[GenerationEvent]:
        return self._start(self.prompt_ids(messages), params)

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[GenerationEvent]:
        refuse_if_too_long(prompt, self._tok.max_token_bytes, self.context_length)
        return self._start(self._tok.encode_text(prompt, add_special=True), params)

    def _start(self, ids: list[int], params: SamplingParams) -> Iterator[GenerationEvent]:
        max_new = token_budget(len(ids), self.context_length, params.max_tokens)
        LogitRules.check_vocabulary(params, self._tok.tok.get_vocab_size())
        return compute.stream(lambda: self._generate(ids, params, max_new))

    def unload(self) -> None:
        del self._session


class OnnxEncoder(LoadedModel):
    capabilities = frozenset({EMBEDDINGS})

    def __init__(self, session, model_dir: Path, options: LoadOptions) -> None:  # noqa: ANN001
        import numpy as np

        self._np, self._session = np, session
        self._tok = _Tokenizer(model_dir)
        self._inputs = {i.name for i in session.get_inputs()}
        self.context_length = options.context_length

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        return compute.call(self._embed, texts)

    def _embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        np = self._np
        vectors, tokens = [], 0
        for text in texts:  # one at a time: no padding to get wrong, exact token counts
            encoding = self._tok.tok.encode(text)
            ids = encoding.ids[: self.context_length]
            feed = {"input_ids": np.array([ids], dtype=np.int64)}
            if "attention_mask" in self._inputs:
                feed["attention_mask"] = np.ones((1, len(ids)), dtype=np.int64)
            if "token_type_ids" in self._inputs:
                feed["token_type_ids"] = np.zeros((1, len(ids)), dtype=np.int64)
            hidden = self._session.run(None, feed)[0][0]
            pooled = hidden.mean(axis=0)
            vectors.append((pooled / max(float(np.linalg.norm(pooled)), 1e-12)).tolist())
            tokens += len(ids)
        return vectors, tokens


class OnnxEngine(Engine):
    name = "onnxruntime"
    formats = {"onnx": (".onnx",)}
    # sampled here with numpy: llmlb's logit rules apply; no grammar engine for these exports
    # yet, and top_k / min_p are not in its sampler
    parameters = frozenset({"logprobs", "top_logprobs", "frequency_penalty",
                            "presence_penalty", "repetition_penalty", "logit_bias"})

    def availability(self) -> Availability:
        try:
            import onnxruntime as ort
            import tokenizers  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"{exc.name} is not installed (pip install 'llmlb[onnx]')")
        cuda = "CUDAExecutionProvider" in ort.get_available_providers() and nvidia_driver_present()
        return Availability(True, device="cuda" if cuda else "cpu")

    def load(self, model_dir: Path, artifacts: Sequence[Path],
             options: LoadOptions = LoadOptions()) -> LoadedModel:  # noqa: B008
        return compute.call(self._load, model_dir, artifacts, options)

    def _load(self, model_dir: Path, artifacts: Sequence[Path],
              options: LoadOptions) -> LoadedModel:
        import onnxruntime as ort

        graph = pick_graph(artifacts)
        providers = ["CPUExecutionProvider"]
        if self.availability().device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only; onnxruntime's warnings go to stderr
        try:
            session = ort.InferenceSession(str(graph), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime could not load {graph.name}: {exc}") from exc
        names = {i.name for i in session.get_inputs()}
        if any(n.startswith("past_key_values.") for n in names):
            return OnnxDecoder(session, model_dir, options)
        outputs = {o.name for o in session.get_outputs()}
        if "last_hidden_state" in outputs or "token_embeddings" in outputs:
            return OnnxEncoder(session, model_dir, options)
        raise EngineError(f"{graph.name} is neither a decoder with past_key_values inputs nor "
                          "an encoder with a last_hidden_state output")
