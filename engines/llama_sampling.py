"""Per-sequence sampler chains for llama.cpp: each sequence in a batch samples with its own
parameters and seed.

OpenAI semantics: temperature 0 is greedy; otherwise top-k, temperature, the top-p nucleus,
min-p, then a draw from the sequence's own random generator. Penalties, logit bias and the
grammar of a JSON schema change the logits before the chain runs (``logit_rules``, the same
rules as the transformers engine); logprobs are read before them.
"""

from __future__ import annotations

import random

from .base import SamplingParams


def build_sampler(lib, params: SamplingParams):  # noqa: ANN001, ANN201 - llama_cpp, llama_sampler_p
    """A new sampler chain (free it with ``llama_sampler_free``)."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    if params.temperature <= 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(params.top_k))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
    if params.top_p < 1.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(params.min_p, 1))
    # 0xFFFFFFFF means "random" to llama.cpp: a given seed never maps to it
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed % 0xFFFFFFFF))
    return chain
