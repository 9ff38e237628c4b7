"""Choosing vLLM's tool-call and reasoning parsers from the model's own files."""

from __future__ import annotations

import json
import subprocess

import pytest

from support.real_vllm import REPO, real_vllm_python
from worker.launch.model_facts import ModelInfo, read_model_info
from worker.launch.parser_choice import FAMILIES, choose, identify
from worker.settings.loader import SettingsError

QWEN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}<tool_call>"
LLAMA3_TEMPLATE = "<|start_header_id|>{{ role }}<|end_header_id|>{{ content }}<|eot_id|>"


@pytest.mark.parametrize(("info", "tool", "reasoning"), [
    (ModelInfo("openai/gpt-oss-120b"), "openai", "openai_gptoss"),
    (ModelInfo("model", "gpt_oss"), "openai", "openai_gptoss"),
    (ModelInfo("Qwen/Qwen3-8B", "qwen3"), "hermes", "qwen3"),
    (ModelInfo("Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen3_moe"), "hermes", None),
    (ModelInfo("Qwen/Qwen3-30B-A3B-Thinking-2507", "qwen3_moe"), "hermes", "qwen3"),
    (ModelInfo("Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen3_moe"), "qwen3_coder", None),
    (ModelInfo("Qwen/Qwen2.5-7B-Instruct", "qwen2"), "hermes", None),
    (ModelInfo("Qwen/Qwen2.5-Coder-32B-Instruct", "qwen2"), "hermes", None),
    (ModelInfo("Qwen/QwQ-32B", "qwen2"), "hermes", "deepseek_r1"),
    (ModelInfo("meta-llama/Llama-3.1-8B-Instruct", "llama"), "llama3_json", None),
    (ModelInfo("meta-llama/Llama-3.3-70B-Instruct", "llama"), "llama3_json", None),
    (ModelInfo("meta-llama/Llama-4-Scout-17B-16E-Instruct", "llama4"), "llama4_pythonic", None),
    (ModelInfo("NousResearch/Hermes-3-Llama-3.1-8B", "llama"), "hermes", None),
    (ModelInfo("mistralai/Mistral-Small-3.2-24B-Instruct-2506", "mistral3"), "mistral", None),
    (ModelInfo("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral"), "mistral", None),
    (ModelInfo("mistralai/Magistral-Small-2509", "mistral3"), "mistral", "mistral"),
    (ModelInfo("deepseek-ai/DeepSeek-V3-0324", "deepseek_v3"), "deepseek_v3", None),
    (ModelInfo("deepseek-ai/DeepSeek-V3.1", "deepseek_v3"), "deepseek_v31", "deepseek_v3"),
    (ModelInfo("deepseek-ai/DeepSeek-R1-0528", "deepseek_v3"), "deepseek_v3", "deepseek_r1"),
    (ModelInfo("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "qwen2"), None, "deepseek_r1"),
    (ModelInfo("moonshotai/Kimi-K2-Instruct", "kimi_k2"), "kimi_k2", "kimi_k2"),
    (ModelInfo("google/gemma-3-27b-it", "gemma3"), None, None),
    (ModelInfo("zai-org/GLM-4.6", "glm4_moe"), "glm45", "glm45"),
    (ModelInfo("ibm-granite/granite-3.3-8b-instruct", "granite"), "granite", "granite"),
    (ModelInfo("microsoft/Phi-4-mini-instruct", "phi3"), "phi4_mini_json", None),
    (ModelInfo("MiniMaxAI/MiniMax-M2", "minimax_m2"), "minimax_m2", "minimax_m2_append_think"),
])
def test_families_people_deploy_get_their_parsers(info: ModelInfo, tool: str | None,
                                                  reasoning: str | None) -> None:
    choice = choose(info, None, None, None)
    assert (choice.tool_parser, choice.reasoning_parser) == (tool, reasoning)
    assert choice.auto_tool_choice is (tool is not None)


def test_chat_templates_identify_fine_tunes_with_unknown_names() -> None:
    assert choose(ModelInfo("my-org/support-bot", "llama", QWEN_TEMPLATE),
                  None, None, None).tool_parser == "hermes"
    assert choose(ModelInfo("my-org/support-bot", "llama", LLAMA3_TEMPLATE),
                  None, None, None).tool_parser == "llama3_json"


def test_unknown_families_get_no_parser_and_a_reason_naming_the_settings() -> None:
    choice = choose(ModelInfo("acme/mystery-7b", "mystery"), None, None, None)
    assert (choice.tool_parser, choice.reasoning_parser) == (None, None)
    assert "set TOOL_CALL_PARSER (and ENABLE_AUTO_TOOL_CHOICE=true)" in choice.reasons[0]
    assert "REASONING_PARSER" in choice.reasons[1]


def test_explicit_values_win_and_empty_turns_off() -> None:
    gpt_oss = ModelInfo("openai/gpt-oss-20b", "gpt_oss")
    assert choose(gpt_oss, None, "hermes", "deepseek_r1").tool_parser == "hermes"
    assert choose(gpt_oss, None, "hermes", "deepseek_r1").reasoning_parser == "deepseek_r1"
    off = choose(gpt_oss, False, None, "")
    assert (off.tool_parser, off.reasoning_parser) == (None, None)
    assert choose(gpt_oss, None, "", None).tool_parser is None
    assert choose(gpt_oss, True, None, None).tool_parser == "openai"


def test_turning_tools_on_for_an_unknown_family_fails_at_start() -> None:
    with pytest.raises(SettingsError, match="set TOOL_CALL_PARSER"):
        choose(ModelInfo("acme/mystery-7b"), True, None, None)


def test_the_tiny_model_gets_a_parser_its_template_supports() -> None:
    tiny = REPO / ".models" / "tiny-chat"
    info = read_model_info("tiny-chat", str(tiny))
    assert identify(info) is not None and choose(info, None, None, None).tool_parser == "hermes"


def test_every_parser_in_the_table_exists_in_the_vllm_this_project_runs() -> None:
    script = ("import json\nfrom vllm.tool_parsers import ToolParserManager as T\n"
              "from vllm.reasoning import ReasoningParserManager as R\n"
              "print(json.dumps([sorted(set(T.tool_parsers) | set(T.lazy_parsers)),"
              " sorted(R.list_registered())]))")
    done = subprocess.run([real_vllm_python(), "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tools, reasonings = json.loads(done.stdout.strip().splitlines()[-1])
    assert {f.tool_parser for f in FAMILIES if f.tool_parser} - set(tools) == set()
    assert {f.reasoning_parser for f in FAMILIES if f.reasoning_parser} - set(reasonings) == set()
    assert "hermes" in tools and "llama3_json" in tools


def test_the_readme_table_lists_the_families_as_the_code_has_them() -> None:
    def shown(parser: str | None) -> str:
        return f"`{parser}`" if parser else "none"

    rows = [f"| {f.name} | {shown(f.tool_parser)} | {shown(f.reasoning_parser)} |"
            for f in FAMILIES]
    readme = (REPO / "README.md").read_text()
    start = readme.index("| Family | Tool-call parser | Reasoning parser |")
    table = readme[start:].split("\n\n", 1)[0].splitlines()[2:]
    assert table == rows
