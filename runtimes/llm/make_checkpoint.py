"""A small random Llama checkpoint with a trained tokenizer, written offline.

    make_checkpoint("/tmp/tiny", layers=2, hidden=64, heads=4, kv_heads=2, vocab=512, seed=0)

The directory is a Hugging Face-style checkpoint that transformers loads as well
(LlamaForCausalLM.from_pretrained, PreTrainedTokenizerFast): config.json,
model.safetensors (random weights, normal(0, 0.02) like transformers' init, norms at 1),
generation_config.json, tokenizer.json (a byte-level BPE trained here with `tokenizers`
on a built-in corpus), tokenizer_config.json with a simple chat template, and
special_tokens_map.json. The same seed gives the same files. No network access.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (UNK, BOS, EOS, *ROLE_TOKENS)  # ids 0.. in this order

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# A few paragraphs for the tokenizer to learn merges from (any English text would do).
CORPUS = """\
A model gateway routes every request to a runtime that has the model loaded.
The runtime streams tokens back to the client as soon as they are generated.
Continuous batching lets new requests join the running batch at every step.
The key value cache holds the attention keys and values of every sequence.
When the cache is full, new requests wait in the queue until memory is free.
A client that goes away cancels its request, and its cache blocks are freed at once.
The scheduler picks which sequences run in the next step and how many tokens each gets.
Greedy decoding always takes the most likely next token; sampling draws from the distribution.
Temperature sharpens or flattens the distribution; top k and top p cut its long tail.
A seed makes sampling reproducible, whatever else is running in the same batch.
Stop strings end the text before they appear, and the client never sees a part of one.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
Hello world! How are you today? I am fine, thank you. What is the weather like?
It is sunny and warm in the morning, with a little rain in the afternoon.
Numbers: one two three four five six seven eight nine ten, 0 1 2 3 4 5 6 7 8 9.
The registry keeps the desired state in etcd; the reconciler makes it real.
Each replica registers an endpoint under a lease that expires when the replica dies.
Load figures tell the gateway how busy each replica is, so it can route well.
Small models are fast to test; large models need more memory and more time.
Tokens are pieces of words; a tokenizer turns text into tokens and back again.
Questions and answers, stories and poems, code and data: all of it is text.
def main(): print("hello, world") # a line of code among the prose
The user asks a question and the assistant answers it as well as it can.
"""


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) trained on CORPUS, adding <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.splitlines()
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    # the corpus supports ~800 tokens; beyond, reserved tokens fill the vocabulary (as real
    # checkpoints have), so that every id the model can emit decodes to something
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def write_tokenizer(directory: str | Path, vocab_size: int = 512, max_length: int = 2048) -> dict[str, int]:
    """tokenizer.json, tokenizer_config.json (chat template) and special_tokens_map.json;
    returns the special token ids {"bos": .., "eos": .., "unk": ..}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json",
                {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": EOS,
                 "additional_special_tokens": list(ROLE_TOKENS)})
    return {"bos": tokenizer.token_to_id(BOS), "eos": tokenizer.token_to_id(EOS), "unk": tokenizer.token_to_id(UNK)}


def llama_config(*, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, intermediate: int | None = None,
                 max_position: int = 2048, bos_token_id: int = 1, eos_token_id: int = 2,
                 tie_embeddings: bool = False, rope_theta: float = 10000.0) -> dict[str, Any]:
    """config.json of a Llama model (transformers' field names)."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv-heads ({kv_heads})")
    if (hidden // heads) % 2:
        raise ValueError(f"the head size hidden/heads = {hidden // heads} must be even (rotary embeddings)")
    if intermediate is None:  # Llama's 8/3 * hidden, rounded up to a multiple of 16
        intermediate = -(-(8 * hidden // 3) // 16) * 16
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": vocab,
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def random_weights(config: dict[str, Any], seed: int = 0, std: float = 0.02) -> dict[str, Any]:
    """Tensors under transformers' Llama names, drawn from a seeded generator."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[f"{p}input_layernorm.weight"] = torch.ones(hidden)
        weights[f"{p}self_attn.q_proj.weight"] = normal(q_out, hidden)
        weights[f"{p}self_attn.k_proj.weight"] = normal(kv_out, hidden)
        weights[f"{p}self_attn.v_proj.weight"] = normal(kv_out, hidden)
        weights[f"{p}self_attn.o_proj.weight"] = normal(hidden, q_out)
        weights[f"{p}post_attention_layernorm.weight"] = torch.ones(hidden)
        weights[f"{p}mlp.gate_proj.weight"] = normal(inter, hidden)
        weights[f"{p}mlp.up_proj.weight"] = normal(inter, hidden)
        weights[f"{p}mlp.down_proj.weight"] = normal(hidden, inter)
    weights["model.norm.weight"] = torch.ones(hidden)
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = normal(config["vocab_size"], hidden)
    return weights


def make_checkpoint(directory: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    vocab: int = 512, intermediate: int | None = None, max_position: int = 2048, seed: int = 0,
                    tie_embeddings: bool = False) -> Path:
    """Write the checkpoint into `directory` (created if needed); returns its path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    special = write_tokenizer(directory, vocab, max_position)
    config = llama_config(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                          intermediate=intermediate, max_position=max_position, bos_token_id=special["bos"],
                          eos_token_id=special["eos"], tie_embeddings=tie_embeddings)
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json",
                {"bos_token_id": special["bos"], "eos_token_id": special["eos"]})
    weights = random_weights(config, seed)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
