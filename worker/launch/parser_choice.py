"""Pick vLLM's tool-call and reasoning parsers for the model being served.

OpenWebUI sends its built-in tools with every chat; a vLLM started without
`--enable-auto-tool-choice --tool-call-parser ...` answers those chats with a
400. The right parser depends on the model family, so when `TOOL_CALL_PARSER`,
`ENABLE_AUTO_TOOL_CHOICE` and `REASONING_PARSER` are unset the worker picks
them from `FAMILIES` below, matching the model's name, its `config.json`
`model_type`, and, for Hermes-style tool calls, its chat template.

Rules: an explicit value always wins; `false`/`off` turns the feature off (an
empty value means automatic: a blank Hub form field arrives empty); an unknown
family gets no parser, and the start-up log says so once, naming the variables
to set. A test checks that every parser
named here exists in the vLLM version the project runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.launch.model_facts import ModelInfo
from worker.settings.loader import SettingsError


@dataclass(frozen=True)
class Family:
    name: str
    names: str  # regex searched in the lowercased model name
    model_types: frozenset[str]
    tool_parser: str | None
    reasoning_parser: str | None = None


def _family(name: str, names: str, model_types: str, tool: str | None,
            reasoning: str | None = None) -> Family:
    return Family(name, names, frozenset(model_types.split()), tool, reasoning)


# First match wins: specific variants come before their family.
FAMILIES: tuple[Family, ...] = (
    _family("gpt-oss", r"gpt-oss", "gpt_oss", "openai", "openai_gptoss"),
    _family("Qwen3 Coder", r"qwen3-coder", "", "qwen3_coder"),
    _family("Qwen3 Instruct 2507 (answers without thinking)", r"qwen3-.*instruct-2507", "",
            "hermes"),
    _family("Qwen3", r"qwen3", "qwen3 qwen3_moe", "hermes", "qwen3"),
    _family("QwQ", r"qwq", "", "hermes", "deepseek_r1"),
    _family("Qwen2.5 (and Coder)", r"qwen2\.5", "qwen2 qwen2_moe", "hermes"),
    _family("DeepSeek R1 distills (Qwen, Llama)", r"deepseek-r1-distill", "", None,
            "deepseek_r1"),
    _family("Kimi K2", r"kimi-k2", "kimi_k2", "kimi_k2", "kimi_k2"),
    _family("DeepSeek V3.2", r"deepseek-v3\.2", "deepseek_v32", "deepseek_v32", "deepseek_v3"),
    _family("DeepSeek V3.1", r"deepseek-v3\.1", "", "deepseek_v31", "deepseek_v3"),
    _family("DeepSeek R1", r"deepseek-r1", "", "deepseek_v3", "deepseek_r1"),
    _family("DeepSeek V3", r"deepseek-v3", "deepseek_v3", "deepseek_v3"),
    _family("Llama 4", r"llama-4", "llama4", "llama4_pythonic"),
    _family("Hermes (Nous)", r"hermes", "", "hermes"),
    _family("Llama 3.x", r"llama-3", "", "llama3_json"),
    _family("Magistral", r"magistral", "", "mistral", "mistral"),
    _family("Mistral, Mixtral, Devstral", r"mistral|mixtral|devstral|ministral",
            "mistral mixtral mistral3 ministral", "mistral"),
    _family("Gemma 4", r"gemma-4", "gemma4 gemma4_text", "gemma4", "gemma4"),
    _family("FunctionGemma", r"functiongemma", "", "functiongemma"),
    _family("Gemma 3 (no tool-call format in its template)", r"gemma-3",
            "gemma3 gemma3_text", None),
    _family("GLM-4.7", r"glm-4\.7", "", "glm47", "glm47"),
    _family("GLM-4.5 / 4.6", r"glm-4\.[56]", "glm4_moe", "glm45", "glm45"),
    _family("Granite 4", r"granite-4", "granitemoehybrid", "granite4"),
    _family("Granite 3", r"granite-3", "granite granitemoe", "granite", "granite"),
    _family("Phi-4 mini", r"phi-4-mini", "", "phi4_mini_json"),
    _family("MiniMax M2", r"minimax-m2", "minimax_m2", "minimax_m2", "minimax_m2_append_think"),
    _family("InternLM", r"internlm", "internlm2 internlm3", "internlm"),
    _family("Seed-OSS", r"seed-oss", "seed_oss", "seed_oss", "seed_oss"),
    _family("Hunyuan A13B", r"hunyuan-a13b", "hunyuan_v1_moe", "hunyuan_a13b", "hunyuan_a13b"),
    _family("ERNIE 4.5", r"ernie-4\.5", "ernie4_5 ernie4_5_moe", "ernie45", "ernie45"),
    _family("OLMo 3", r"olmo-3", "olmo3", "olmo3", "olmo3"),
    _family("Jamba", r"jamba", "jamba", "jamba"),
    _family("xLAM", r"xlam", "", "xlam"),
    _family("Step3", r"step-?3", "step3_vl step3", "step3", "step3"),
)
# Chat templates that write tool calls as <tool_call>{json}</tool_call> (Hermes style).
HERMES_TEMPLATE = Family("Hermes-style <tool_call> chat template", "", frozenset(), "hermes")
LLAMA3_TEMPLATE = Family("Llama 3 chat template", "", frozenset(), "llama3_json")


@dataclass(frozen=True)
class Choice:
    tool_parser: str | None
    reasoning_parser: str | None
    reasons: tuple[str, ...]

    @property
    def auto_tool_choice(self) -> bool:
        return self.tool_parser is not None


def identify(info: ModelInfo) -> Family | None:
    """The model's family from FAMILIES (or from its chat template), None when unknown."""
    name = info.name.lower().rsplit("/", 1)[-1]
    for family in FAMILIES:
        if re.search(family.names, name):
            return family
    for family in FAMILIES:
        if info.model_type and info.model_type in family.model_types:
            return family
    if "<tool_call>" in info.chat_template:
        return HERMES_TEMPLATE
    if info.model_type == "llama" and "<|eot_id|>" in info.chat_template:
        return LLAMA3_TEMPLATE
    return None


def choose(info: ModelInfo, enable_auto_tool_choice: bool | None, tool_call_parser: str | None,
           reasoning_parser: str | None) -> Choice:
    """Apply the rules in the module docstring (None = automatic, "" = explicitly off)."""
    family = identify(info)
    known = f"{info.name} looks like {family.name}" if family else None
    reasons: list[str] = []
    tool: str | None = None
    if enable_auto_tool_choice is False or tool_call_parser == "":
        reasons.append("tool calling off: set so by ENABLE_AUTO_TOOL_CHOICE/TOOL_CALL_PARSER")
    elif tool_call_parser:
        tool = tool_call_parser
        reasons.append(f"tool-call parser {tool}: from TOOL_CALL_PARSER")
    elif family and family.tool_parser:
        tool = family.tool_parser
        reasons.append(f"tool-call parser {tool}: {known}")
    elif enable_auto_tool_choice:
        raise SettingsError(
            f"ENABLE_AUTO_TOOL_CHOICE=true, but no tool-call parser is known for {info.name}: "
            "set TOOL_CALL_PARSER (e.g. hermes, llama3_json, mistral, openai).")
    else:
        what = f" ({family.name})" if family else ""
        reasons.append(f"tool calling off: no tool-call parser known for {info.name}{what}; "
                       "set TOOL_CALL_PARSER (and ENABLE_AUTO_TOOL_CHOICE=true) to turn it on")
    reasoning: str | None = None
    if reasoning_parser == "":
        reasons.append("reasoning parser off: set so by REASONING_PARSER")
    elif reasoning_parser:
        reasoning = reasoning_parser
        reasons.append(f"reasoning parser {reasoning}: from REASONING_PARSER")
    elif family and family.reasoning_parser:
        reasoning = family.reasoning_parser
        reasons.append(f"reasoning parser {reasoning}: {known}")
    else:
        reasons.append(f"no reasoning parser for {info.name}; set REASONING_PARSER if the model "
                       "writes its reasoning before the answer")
    return Choice(tool, reasoning, tuple(reasons))
