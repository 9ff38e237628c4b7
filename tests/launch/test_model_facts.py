"""What a model's own files say about it: type, template, architectures, longest context."""

from __future__ import annotations

import json
from pathlib import Path

from worker.launch.model_facts import ModelInfo, read_model_info

QWEN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}<tool_call>"
LLAMA3_TEMPLATE = "<|start_header_id|>{{ role }}<|end_header_id|>{{ content }}<|eot_id|>"


def test_model_files_are_read_from_the_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}))
    assert read_model_info("x", str(tmp_path)) == ModelInfo("x", "qwen3", QWEN_TEMPLATE)
    (tmp_path / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    assert read_model_info("x", str(tmp_path)).chat_template == LLAMA3_TEMPLATE
    (tmp_path / "config.json").write_text("{broken")
    assert read_model_info("x", str(tmp_path)).model_type == ""
    assert read_model_info("x", None) == ModelInfo("x")


def test_the_longest_context_is_what_the_files_allow_unless_rope_stretches_it(
        tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096,
                                                      "architectures": ["LlamaForCausalLM"]}))
    assert read_model_info("x", str(tmp_path)).max_positions == 4096
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    assert read_model_info("x", str(tmp_path)).max_positions == 256
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096,
                                                      "rope_scaling": {"factor": 4}}))
    (tmp_path / "sentence_bert_config.json").unlink()
    assert read_model_info("x", str(tmp_path)).max_positions is None


def test_only_models_with_a_generating_head_count_as_generative() -> None:
    assert ModelInfo("x", architectures=("Qwen3ForCausalLM",)).generative
    assert ModelInfo("x", architectures=("Gemma3ForConditionalGeneration",)).generative
    assert not ModelInfo("x", architectures=("BertModel",)).generative
    assert ModelInfo("unknown").generative, "nothing known: assume it generates"
