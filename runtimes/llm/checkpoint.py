"""A local Hugging Face-style checkpoint directory: config, weights, tokenizer, chat template.

    checkpoint = Checkpoint.open("/models/tiny")        # config + tokenizer; ModelLoadError if bad
    weights = checkpoint.load_weights()                  # {name: tensor}, from safetensors
    ids = checkpoint.tokenizer.encode("Hello")           # bos added as the tokenizer says
    prompt = checkpoint.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])

Reads config.json (Llama, Mistral and Qwen2 fields; both the transformers 4 `rope_theta` +
`rope_scaling` and the transformers 5 `rope_parameters` spellings), model.safetensors or
sharded safetensors with model.safetensors.index.json, tokenizer.json (the `tokenizers`
library), tokenizer_config.json (special tokens, chat template; or chat_template.jinja) and
generation_config.json (eos/bos ids). Never touches the network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelgw.runtimes.errors import ModelLoadError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base theta and scaling (type and its parameters)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """What the decoder needs from config.json."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False       # Qwen2; Llama's attention_bias
    o_bias: bool = False         # Llama's attention_bias also biases o_proj
    mlp_bias: bool = False
    sliding_window: int | None = None  # attention is always full; max_model_len is capped to it
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def kv_bytes_per_token(self) -> int:
        """Elements of K and V per token over all layers (times the dtype size = bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def _int_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def parse_rope(raw: Mapping[str, Any]) -> RopeConfig:
    """Rope settings from either transformers' 4.x or 5.x config spelling."""
    params = raw.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_type" not in params and "rope_theta" not in params:
        params = None  # per-layer-type parameters (not a Llama-family feature)
    scaling = dict(params or raw.get("rope_scaling") or {})
    theta = float(scaling.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"rope scaling type '{rope_type}' is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    factor = float(scaling.get("factor", 1.0))
    if rope_type != "default" and factor <= 0:
        raise ModelLoadError(f"rope scaling factor must be > 0, got {factor}")
    original = scaling.get("original_max_position_embeddings")
    return RopeConfig(
        theta=theta,
        type=rope_type,
        factor=factor,
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original) if original else None,
    )


def parse_config(raw: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """A ModelConfig from a config.json dict; ModelLoadError naming what is wrong."""
    model_type = str(raw.get("model_type", "llama"))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{where}: model_type '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelLoadError(f"{where}: hidden_act '{act}' is not supported (Llama-family models use silu)")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        config = dict(
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            vocab_size=int(raw["vocab_size"]),
        )
    except KeyError as missing:
        raise ModelLoadError(f"{where} lacks {missing}") from None
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelLoadError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise ModelLoadError(f"{where}: head_dim {head_dim} must be even for rotary embeddings")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{where}: partial_rotary_factor is not supported")
    # Qwen2 always biases q/k/v (transformers 5 drops the field); Llama's attention_bias covers o too.
    attention_bias = bool(raw.get("attention_bias", model_type == "qwen2"))
    sliding = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        sliding = None
    if sliding:
        log.info("%s: sliding_window %s is not implemented (full attention); max_model_len is capped to it, "
                 "where both agree", where, sliding)
    eos = _int_list(raw.get("eos_token_id"))
    return ModelConfig(
        model_type=model_type,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=parse_rope(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
        eos_token_ids=tuple(eos),
        **config,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON: {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """tokenizer.json + tokenizer_config.json: encode, decode, special tokens, chat template."""

    def __init__(self, directory: Path, generation_eos: Sequence[int] = ()) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{directory}: no tokenizer.json (the checkpoint needs a fast tokenizer file)")
        try:
            self._tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ModelLoadError(f"{path}: cannot read the tokenizer: {exc}") from None
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        eos_ids = list(generation_eos)
        if self.eos_token and (eos_id := self._tokenizer.token_to_id(self.eos_token)) is not None:
            eos_ids.append(eos_id)
        self.eos_token_ids = tuple(dict.fromkeys(eos_ids))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = self._chat_template(directory, config)
        # HF's Llama tokenizers add <s> by this flag even when tokenizer.json's post-processor does not
        self._add_bos = bool(config.get("add_bos_token", False)) and self.bos_token_id is not None
        self._template: Any = None  # the compiled jinja2 template, made on first use

    @staticmethod
    def _chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = directory / "chat_template.jinja"
        if not template and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return template if isinstance(template, str) and template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template rendered (jinja2, sandboxed, as transformers does)."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json 'chat_template')")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Prompt token ids for chat messages (the template writes bos itself)."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _compile_template(source: str) -> Any:
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ModelLoadError("chat templates need jinja2: pip install 'modelgw[llm]'") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None, **_: Any) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=False)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ModelLoadError(f"the chat template does not compile: {exc}") from None


@dataclass
class Checkpoint:
    """An opened checkpoint directory (weights are read on demand: load_weights)."""

    directory: Path
    config: ModelConfig
    tokenizer: Tokenizer
    weight_files: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, uri: str | Path) -> Checkpoint:
        directory = Path(str(uri).removeprefix("file://")).expanduser()
        if not directory.is_dir():
            raise ModelLoadError(f"'{directory}': not a checkpoint directory (config.json, *.safetensors, tokenizer.json)")
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"{directory}: no config.json")
        config = parse_config(_read_json(directory / "config.json"), f"{directory}/config.json")
        generation_path = directory / "generation_config.json"
        generation = _read_json(generation_path) if generation_path.is_file() else {}
        generation_eos = _int_list(generation.get("eos_token_id")) or list(config.eos_token_ids)
        tokenizer = Tokenizer(directory, generation_eos)
        if tokenizer.vocab_size > config.vocab_size:
            raise ModelLoadError(
                f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                f"{config.vocab_size} (config.json vocab_size)"
            )
        return cls(directory, config, tokenizer, _weight_files(directory))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.tokenizer.eos_token_ids

    def load_weights(self) -> dict[str, Any]:
        """Every tensor of the checkpoint by its Hugging Face name (torch, on CPU)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        weights: dict[str, Any] = {}
        for path in self.weight_files:
            try:
                weights.update(load_file(str(path)))
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(f"{path}: cannot read the weights: {exc}") from None
        return weights


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no 'weight_map'")
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shards that are not there: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    if list(directory.glob("*.bin")) or list(directory.glob("*.pth")):
        raise ModelLoadError(f"{directory}: only pickled (.bin/.pth) weights; convert them to safetensors")
    raise ModelLoadError(f"{directory}: no model.safetensors or model.safetensors.index.json")
