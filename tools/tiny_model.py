"""Build a tiny random-weight chat model that vLLM's CPU build can serve.

The worker and its end-to-end tests need a real model behind vLLM's OpenAI server, yet the
machines that run them may have no GPU and no access to the Hugging Face hub. This script builds
one offline in seconds: a <1 MB Llama model with seeded random weights, a byte-level BPE tokenizer
(any text tokenizes), a ChatML chat template that renders tools and tool calls, and the tokens the
hermes tool-call parser and the qwen3 / deepseek_r1 reasoning parsers look for. Its text is
gibberish; its tokens and protocol are real. The same recipe gives the same bytes on every build.

Usage: python tools/tiny_model.py OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the build imports these lazily, so the module imports without them
    import torch
    from tokenizers import Tokenizer

# fmt: off
SEED = 1234
VOCAB_SIZE = 640  # trained BPE vocab plus the added tokens below
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # hidden when decoding
MARKUP = ("<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>",
          "</tool_response>")  # kept in decoded text, for the tool-call and reasoning parsers
BOS, EOS = "<|endoftext|>", "<|im_end|>"
MARKER = "tiny_model.recipe"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", MARKER)
ARCH = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64,  # 16 breaks CPU attention
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": VOCAB_SIZE,
}
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
    "pad_token": BOS, "unk_token": None, "clean_up_tokenization_spaces": False,
    "model_max_length": ARCH["max_position_embeddings"],
}
# fmt: on
CORPUS = """
The quick brown fox jumps over the lazy dog. Hello! How can I help you today?
What is the weather like in Paris on Monday? The answer is 42; 17 and 25 make 42.
Serverless workers start a model server and answer requests: data: [DONE]
You are a helpful assistant. Think step by step, then answer in one short sentence.
Call a tool, read its result, then reply to the user. def add(a: int, b: int) -> int:
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "get_weather", "description": "Get the current
weather in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string",
"description": "The city name."}, "days": {"type": "integer"}, "unit": {"type": "string", "enum":
["celsius", "fahrenheit"]}}, "required": ["city"]}}}
{"type": "function", "function": {"name": "search_web", "description": "Search the web and
return the top results.", "parameters": {"type": "object", "properties": {"query": {"type":
"string", "description": "What to search for."}, "limit": {"type": "number"}, "safe": {"type":
"boolean"}, "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["query"]}}}
"""
CHAT_TEMPLATE = r"""
{%- set system = messages[0].content if messages and messages[0].role == 'system' else none %}
{%- if tools %}
{{- '<|im_start|>system\n' ~ (system ~ '\n\n' if system else '') ~ '# Tools\n\nYou may call one'
 ~ ' or more functions. Their signatures are within <tools></tools> XML tags:\n<tools>' }}
{%- for tool in tools %}{{- '\n' ~ (tool | tojson) }}{%- endfor %}
{{- '\n</tools>\n\nFor each call, return a JSON object with the function name and arguments'
 ~ ' within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>,'
 ~ ' "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif system %}{{- '<|im_start|>system\n' ~ system ~ '<|im_end|>\n' }}
{%- endif %}
{%- for m in messages %}
{%- if m.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{% endif %}
{{- '\n<tool_response>\n' ~ m.content ~ '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{% endif %}
{%- elif not (m.role == 'system' and loop.first) %}
{{- '<|im_start|>' ~ m.role ~ '\n' ~ (m.content or '') }}
{%- for call in m.tool_calls or [] %}
{%- set f = call.function if call.function is defined else call %}
{%- set args = f.arguments if f.arguments is string else f.arguments | tojson %}
{{- '\n<tool_call>\n{"name": "' ~ f.name ~ '", "arguments": ' ~ args ~ '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\n\n</think>\n\n' }}
{%- endif %}{%- endif %}
""".strip()


def recipe_hash(source: bytes) -> str:
    """Return the build's version: a hash of this script's source."""
    return hashlib.sha256(source).hexdigest()[:16]


def is_built(out: Path, version: str) -> bool:
    """Tell whether `out` holds a complete build of `version`."""
    done = all((out / name).is_file() for name in FILES)
    return done and (out / MARKER).read_text().strip() == version


def train_tokenizer() -> Tokenizer:
    """Train a byte-level BPE tokenizer (on the template too, so tool prompts stay short)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    size, alphabet = VOCAB_SIZE - len(SPECIAL) - len(MARKUP), pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([CORPUS, CHAT_TEMPLATE], trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP])
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {VOCAB_SIZE}")
    return tok


def random_weights(arch: dict, seed: int) -> dict[str, torch.Tensor]:
    """Return seeded random Llama weights (bf16; the lm_head is tied to the embeddings)."""
    import torch

    gen, dtype = torch.Generator().manual_seed(seed), torch.bfloat16
    hidden, inter, head = arch["hidden_size"], arch["intermediate_size"], arch["head_dim"]
    q_dim, kv_dim = arch["num_attention_heads"] * head, arch["num_key_value_heads"] * head
    shapes = {"model.embed_tokens": (arch["vocab_size"], hidden), "model.norm": None}
    for i in range(arch["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # fmt: off
        shapes |= {
            p + "self_attn.q_proj": (q_dim, hidden), p + "mlp.gate_proj": (inter, hidden),
            p + "self_attn.k_proj": (kv_dim, hidden), p + "mlp.up_proj": (inter, hidden),
            p + "self_attn.v_proj": (kv_dim, hidden), p + "mlp.down_proj": (hidden, inter),
            p + "self_attn.o_proj": (hidden, q_dim), p + "input_layernorm": None,
            p + "post_attention_layernorm": None,
        }
        # fmt: on
    return {
        f"{name}.weight": (
            torch.randn(shape, generator=gen) * 0.02 if shape else torch.ones(hidden)
        ).to(dtype)
        for name, shape in shapes.items()
    }


def configs(tok: Tokenizer) -> dict[str, dict]:
    """Return the JSON files of the model folder, keyed by file name."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": bos}
    return {
        "config.json": ARCH | ids,
        "generation_config.json": ids | {"eos_token_id": [eos, bos]},
        "tokenizer_config.json": TOKENIZER_CONFIG | {"chat_template": CHAT_TEMPLATE},
    }


def build(out: Path, version: str) -> None:
    """Build the model into a temp folder beside `out`, then move it into place."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise RuntimeError(f"{out} exists and is not a tiny-model build; not replacing it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        print("tiny_model: training the byte-level BPE tokenizer", flush=True)
        tok = train_tokenizer()
        tok.save(str(tmp / "tokenizer.json"))
        print(f"tiny_model: writing seeded random weights (seed {SEED})", flush=True)
        save_file(random_weights(ARCH, SEED), str(tmp / "model.safetensors"), {"format": "pt"})
        print("tiny_model: writing config, generation config and tokenizer config", flush=True)
        for name, data in configs(tok).items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        (tmp / MARKER).write_text(version + "\n")
        for path in (tmp, *tmp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        old = tmp.with_suffix(".old")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and build the model unless it is already there."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="folder to build the model into")
    out = parser.parse_args(argv).output_dir.resolve()
    version = recipe_hash(Path(__file__).read_bytes())
    if is_built(out, version):
        print(f"tiny_model: {out} already holds build {version}; nothing to do")
        return 0
    start = time.monotonic()
    try:
        build(out, version)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one clear line
        hint = "; use the vLLM venv's python" if isinstance(exc, ImportError) else ""
        print(f"tiny_model: error: build failed: {exc}{hint}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    took = time.monotonic() - start
    print(f"tiny_model: built {out} ({size:.1f} MB, build {version}) in {took:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
