"""Checkpoint directories: what `make_checkpoint` writes is a checkpoint transformers
reads the same way we do; sharded safetensors load like a single file; rope scaling
tables equal transformers'; broken checkpoints fail to load with a clear reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from llm_helpers import greedy, make_engine, run, save_hf_checkpoint, tiny_checkpoint

from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.llm.checkpoint import Checkpoint, parse_config
from modelgw.runtimes.llm.engine import GenerationRequest
from modelgw.runtimes.llm.model import rope_tables

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("made") / "tiny", vocab=600, seed=5)


def test_made_checkpoint_reads_the_same_in_transformers(made: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = Checkpoint.open(made)
    tokenizer = AutoTokenizer.from_pretrained(made)
    for text in ("Hello world", " héllo wörld 日本 🙂", "A model gateway routes every request."):
        assert ours.tokenizer.encode(text) == tokenizer(text)["input_ids"], text
        ids = ours.tokenizer.encode(text)
        assert ours.tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.tokenizer.vocab_size == 600 == len(tokenizer)  # padded with reserved tokens
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.tokenizer.render_chat(messages) == rendered
    assert ours.eos_token_ids == (tokenizer.eos_token_id,)

    model = AutoModelForCausalLM.from_pretrained(made, dtype=torch.float32).eval()
    ids = ours.tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    engine = make_engine(made, max_num_seqs=2, max_num_batched_tokens=64)
    result = run(engine, [GenerationRequest("r", tuple(ids), greedy(12, ignore_eos=True))])["r"]
    assert result.tokens == out[0, len(ids):].tolist()


def test_same_seed_same_checkpoint(made: Path, tmp_path: Path) -> None:
    again = tiny_checkpoint(tmp_path / "again", vocab=600, seed=5)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (made / name).read_bytes(), name
    other = tiny_checkpoint(tmp_path / "other", vocab=600, seed=6)
    assert (other / "model.safetensors").read_bytes() != (made / "model.safetensors").read_bytes()


def test_sharded_safetensors_load_like_one_file(tmp_path: Path) -> None:
    import transformers

    single = save_hf_checkpoint(tmp_path / "single")
    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(single / name, sharded / name)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected several shards"
    one, many = Checkpoint.open(single).load_weights(), Checkpoint.open(sharded).load_weights()
    assert one.keys() == many.keys()
    assert all(torch.equal(one[k], many[k]) for k in one)

    # a missing shard is named
    missing = sorted(set(index["weight_map"].values()))[-1]
    (sharded / missing).unlink()
    with pytest.raises(ModelLoadError, match=missing):
        Checkpoint.open(sharded)


@pytest.mark.parametrize("rope_scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_rope_tables_equal_transformers(rope_scaling: dict | None) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=512, rope_theta=500000.0,
                            rope_scaling=rope_scaling)
    positions = torch.arange(512).unsqueeze(0)
    theirs_cos, theirs_sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions)
    ours_cos, ours_sin = rope_tables(parse_config(hf_config.to_dict()), 512)
    assert torch.allclose(ours_cos, theirs_cos[0], atol=1e-6)
    assert torch.allclose(ours_sin, theirs_sin[0], atol=1e-6)


def test_transformers_4_config_spelling() -> None:
    raw = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 100, "rope_theta": 1e6,
           "rope_scaling": {"type": "linear", "factor": 2.0}}
    config = parse_config(raw)
    assert config.rope.theta == 1e6 and config.rope.type == "linear" and config.rope.factor == 2.0
    assert config.num_kv_heads == 4 and config.head_dim == 16


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: _edit_config(d, model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (lambda d: _edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope scaling type 'yarn'"),
    (lambda d: _edit_config(d, num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda d: _edit_config(d, vocab_size=100), "the tokenizer has 600 tokens but the model only 100"),
    (lambda d: _edit_config(d, num_hidden_layers=3), "lacks the weight 'model.layers.2."),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "cannot read the weights"),
])
def test_broken_checkpoints_fail_with_a_reason(made: Path, tmp_path: Path, change, message: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(made, broken)
    change(broken)
    with pytest.raises(ModelLoadError, match=_escape(message)):
        make_engine(broken)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a checkpoint directory"):
        Checkpoint.open(tmp_path / "nowhere")


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _escape(text: str) -> str:
    import re

    return re.escape(text)
