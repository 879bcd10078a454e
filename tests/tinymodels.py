"""Tiny random-weight models built locally for tests and benchmarks.

Nothing is downloaded: tokenizers are trained on a built-in corpus and weights
are drawn from a seeded generator, so every artifact is deterministic.

* ``make_tokenizer`` - byte-level BPE tokenizer with a ChatML chat template.
* ``make_llama_safetensors`` - ``LlamaForCausalLM`` in Hugging Face layout.
* ``make_llama_gguf`` - the same model as a llama.cpp GGUF file.
* ``make_llama_onnx`` - the same model as an ONNX decoder with KV cache
  (optimum / transformers.js layout).
* ``make_bert_embedding`` - tiny ``BertModel`` with a WordPiece tokenizer.
* ``build_all`` - all of the above under one root directory.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START]  # ids 0..3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins
with a single step. All that glitters is not gold, and not all those who wander are lost.
Language models read text as a sequence of tokens and predict the next token, one at a
time, until they reach an end of sequence marker or a length limit. A server that speaks
the OpenAI protocol accepts chat messages, applies a chat template, and streams tokens
back to the client as they are generated.
It was the best of times, it was the worst of times, it was the age of wisdom, it was
the age of foolishness. The weather today is sunny with a light breeze from the west,
and the temperature should reach twenty degrees in the afternoon.
Numbers like 0, 1, 2, 3, 42, 100, 2024 and 3.14159 appear in text as well as names such
as Alice, Bob, Paris, London and Tokyo. Hello world! How are you? I am fine, thank you.
Caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e, \u0420\u043e\u0441\u0441\u0438\u044f and emoji \U0001f600 are text too.
"""

_SYLLABLES = "ka lo mi ne ru sa te vo zu pre str ing ion ent al ous"


def _corpus_lines(n_extra: int) -> list[str]:
    """The built-in corpus plus seeded pseudo-words, so that big vocabularies fill up."""
    lines = CORPUS.splitlines() * 4
    rng = random.Random(1234)
    syl = _SYLLABLES.split()
    for _ in range(n_extra):
        words = ("".join(rng.choices(syl, k=rng.randint(1, 4))) for _ in range(12))
        lines.append(" ".join(words))
    return lines


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' save/load progress bars, restoring the caller's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def make_tokenizer(dst_dir: Path, *, vocab_size: int = 512, model_max_length: int = 512) -> None:
    """Train a byte-level BPE tokenizer and save ``tokenizer.json`` + ``tokenizer_config.json``.

    Ids 0..3 are ``<|begin_of_text|>`` (BOS, prepended when encoding), ``<|im_end|>`` (EOS),
    ``<|pad|>`` and ``<|im_start|>``. If the corpus cannot fill ``vocab_size``, the rest is
    padded with ``<|reserved_N|>`` special tokens so the vocabulary size is exact.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError("vocab_size must cover the 256 byte tokens and the special tokens")
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    # use_regex=True is GPT-2's split pattern: llama.cpp pre-tokenizer "gpt-2" matches it.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The English corpus alone yields ~650 tokens; pseudo-words fill bigger vocabularies.
    tok.train_from_iterator(_corpus_lines(2 * vocab_size if vocab_size > 600 else 0), trainer)
    n = tok.get_vocab_size()
    if n < vocab_size:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - n)])
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, 0)],
            ),
        ]
    )
    tok.save(str(dst_dir / "tokenizer.json"))
    _write_json(
        dst_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "padding_side": "left",
            "chat_template": CHAT_TEMPLATE,
            "model_input_names": ["input_ids", "attention_mask"],
        },
    )


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: byte-level token character -> byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]
    return dict(zip(chars, printable + rest, strict=True))


def _suppressed_token_ids(tokenizer_json: Path) -> list[int]:
    """Special tokens and tokens that are not complete printable UTF-8 on their own."""
    data = json.loads(Path(tokenizer_json).read_text())
    dec = _byte_decoder()
    ids = [t["id"] for t in data["added_tokens"]]
    for token, idx in data["model"]["vocab"].items():
        try:
            text = bytes(dec[ch] for ch in token).decode("utf-8")
        except UnicodeDecodeError:
            ids.append(idx)
            continue
        if any(not ch.isprintable() and ch not in "\n\t" for ch in text):
            ids.append(idx)
    return sorted(set(ids))


def _favourite_token(model: torch.nn.Module) -> int:
    """The token a model writes most often, greedily, after a few prompts."""
    counts: Counter[int] = Counter()
    for start in ([0, 3, 300, 301], [0, 3, 400, 10, 20], [0, 3, 280]):
        ids = torch.tensor([start])
        out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=None,
                             pad_token_id=2)
        counts.update(out[0, len(start):].tolist())
    return counts.most_common(1)[0][0]


def _init_llama_weights(model: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled random weights from a private seeded generator.

    Unit-scale activations make attention sharp and position dependent, so a wrong
    rotary layout or a broken KV cache changes the output instead of hiding under
    near-uniform attention; the lm_head gain spreads logits (std ~2.5) so greedy
    choices are rarely near ties and mostly survive float16.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm gains, kept near 1 but distinct per tensor
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                gain = 3.0 if name.startswith("lm_head") else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / p.shape[1] ** 0.5))


def make_llama_safetensors(
    dst_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    seed: int = 0,
    brief: bool = False,
) -> Path:
    """Save a random ``LlamaForCausalLM`` with its tokenizer in Hugging Face layout.

    The defaults give ~0.14M parameters (~0.6 MB). For a CPU benchmark model of ~63M
    parameters (~250 MB float32) use ``hidden_size=768, num_layers=8, num_heads=12,
    num_kv_heads=4, intermediate_size=2048, vocab_size=8192``.

    ``brief``: the model ends its answers (a few dozen tokens) instead of writing until the
    limit: end-of-sequence scores a hair above the token it writes most often, so it stops
    where it would have written that one — for clients that send no output limit.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(dst_dir, vocab_size=vocab_size, model_max_length=max_position_embeddings)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    _init_llama_weights(model, seed)
    # A zero lm_head row pins that token's logit at 0, far below the top logits, so
    # greedy output never stops early on EOS and is always printable UTF-8 text.
    with torch.no_grad():
        model.lm_head.weight[_suppressed_token_ids(dst_dir / "tokenizer.json")] = 0.0
        if brief:
            model.lm_head.weight[1] = model.lm_head.weight[_favourite_token(model)] * 1.02
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with _no_progress_bars():
        model.save_pretrained(dst_dir)
    return dst_dir


def _permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half layout to llama.cpp's interleaved pairs.

    HF keeps each head as [first halves | second halves]; llama.cpp's RoPE rotates
    adjacent pairs, so within each head row ``i`` of half ``h`` moves to ``2 * i + h``.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def make_llama_gguf(src_dir: Path, dst_file: Path, *, dtype: str = "f32") -> Path:
    """Convert a ``make_llama_safetensors`` directory into a llama.cpp GGUF file.

    ``dtype`` is ``"f32"`` or ``"f16"`` (1-D norm weights always stay float32, as in
    llama.cpp's own converter). Tokenizer, special ids and chat template are copied.
    """
    import gguf
    from safetensors.numpy import load_file

    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    src_dir, dst_file = Path(src_dir), Path(dst_file)
    cfg = json.loads((src_dir / "config.json").read_text())
    tok = json.loads((src_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((src_dir / "tokenizer_config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.__getitem__)
    if len(tokens) != cfg["vocab_size"] or vocab[tokens[-1]] != len(tokens) - 1:
        raise ValueError("tokenizer vocabulary must be dense and match config.vocab_size")
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    token_types = [
        gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    dst_file.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(dst_file), "llama")
    w.add_name(src_dir.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float((cfg.get("rope_parameters") or cfg)["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tok_cfg["bos_token"]])
    w.add_eos_token_id(vocab[tok_cfg["eos_token"]])
    w.add_pad_token_id(vocab[tok_cfg["pad_token"]])
    w.add_add_bos_token(bool(tok_cfg.get("add_bos_token", True)))
    w.add_add_eos_token(False)
    w.add_chat_template(tok_cfg["chat_template"])

    for name, arr in load_file(str(src_dir / "model.safetensors")).items():
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            out_name = f"blk.{layer}.{_GGUF_NAMES[rest]}"
        else:
            out_name = _GGUF_NAMES[name]
        if name.endswith("q_proj.weight"):
            arr = _permute_rotary(arr, n_head)
        elif name.endswith("k_proj.weight"):
            arr = _permute_rotary(arr, n_kv)
        if dtype == "f16" and arr.ndim > 1:
            arr = arr.astype(np.float16)
        w.add_tensor(out_name, np.ascontiguousarray(arr))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst_file


_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class _FlatKVDecoder(torch.nn.Module):
    """Flat ``past_key_values.{i}.key/value`` tensors in, logits and ``present.*`` out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pairs = list(zip(past[0::2], past[1::2], strict=True))
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits, *(
            t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
        )


def make_llama_onnx(src_dir: Path, dst_dir: Path) -> Path:
    """Export a ``make_llama_safetensors`` model to ``dst_dir/onnx/model.onnx`` (+ configs).

    Same I/O contract as optimum / transformers.js decoder exports with KV cache:
    inputs ``input_ids``, ``attention_mask`` (past + new length), ``position_ids`` and
    ``past_key_values.{i}.key|value`` of shape [batch, kv_heads, past, head_dim] (past may
    be 0); outputs ``logits`` and ``present.{i}.key|value``.
    """
    import warnings

    from transformers import AutoModelForCausalLM

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    (dst_dir / "onnx").mkdir(parents=True, exist_ok=True)
    for name in _HF_FILES:
        shutil.copyfile(src_dir / name, dst_dir / name)
    with _no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(src_dir, attn_implementation="eager")
    model.eval()
    cfg = model.config
    n_layers, n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_names = [f"{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    past_names = [f"past_key_values.{n}" for n in kv_names]
    present_names = [f"present.{n}" for n in kv_names]
    dynamic_axes = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
        **{n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names},
        **{n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names},
    }
    # Sizes > 1 everywhere so that no axis gets specialised while tracing.
    batch, seq, past = 2, 3, 4
    args = (
        torch.zeros(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).repeat(batch, 1),
        *(torch.zeros(batch, n_kv, past, head_dim) for _ in past_names),
    )
    out_file = dst_dir / "onnx" / "model.onnx"
    # The TorchScript exporter needs no onnxscript and takes ~0.2 s here, against ~6 s
    # for the dynamo one; its tracer warnings concern branches that are shape-invariant
    # for this I/O contract (checked by the KV-cache decoding test).
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _FlatKVDecoder(model).eval(),
            args,
            str(out_file),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=dynamic_axes,
            opset_version=18,
            dynamo=False,
        )
    return dst_dir


def make_bert_embedding(
    dst_dir: Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    vocab_size: int = 1024,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Save a random ``BertModel`` (safetensors) with an uncased WordPiece tokenizer.

    The vocabulary holds the special tokens, every corpus character (alone and as a
    ``##`` continuation) and the most frequent corpus words up to ``vocab_size``.
    """
    from transformers import BertConfig, BertModel

    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # Counted by hand: tokenizers' WordPieceTrainer numbers "##" pieces in hash-map
    # order, so its vocabulary (and thus token ids) changes from run to run.
    counts = Counter(
        word
        for line in _corpus_lines(vocab_size)
        for word, _ in pre.pre_tokenize_str(norm.normalize_str(line))
    )
    chars = sorted({ch for word in counts for ch in word})
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab = [*specials, *chars, *(f"##{ch}" for ch in chars)]
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.save(str(dst_dir / "tokenizer.json"))
    _write_json(
        dst_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
            "model_max_length": max_position_embeddings,
            "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        },
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        architectures=["BertModel"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # BertModel draws its init from the global generator
        model = BertModel(config).eval()
    with _no_progress_bars():
        model.save_pretrained(dst_dir)
    return dst_dir


def build_all(root: Path, *, seed: int = 0) -> dict[str, Path]:
    """Build the default tiny set under ``root``; all Llama variants share weights and tokenizer.

    Returns paths keyed ``llama-st``, ``llama-gguf`` (the ``.gguf`` file), ``llama-onnx``
    and ``bert-embed``.
    """
    root = Path(root)
    st = make_llama_safetensors(root / "llama-st", seed=seed)
    return {
        "llama-st": st,
        "llama-gguf": make_llama_gguf(st, root / "llama-gguf" / "model.gguf"),
        "llama-onnx": make_llama_onnx(st, root / "llama-onnx"),
        "bert-embed": make_bert_embedding(root / "bert-embed", seed=seed),
    }
