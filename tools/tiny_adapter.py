"""Build a tiny LoRA adapter for the tiny test model, offline, in plain Python.

    python tools/tiny_adapter.py OUTPUT_DIR [--seed N] [--rank R] [--hidden H] [--base NAME]

A PEFT adapter is two files: `adapter_config.json` and `adapter_model.safetensors`,
whose tensors are `base_model.model.model.layers.<i>.self_attn.<q|v>_proj.lora_A.weight`
of shape (rank, hidden) and `...lora_B.weight` of shape (hidden, rank). The weights are
seeded random values large enough to change the model's greedy output, so a test can
tell the adapter was used. safetensors is written by hand (an 8-byte header length, the
JSON header, the float32 data), so no torch is needed: the tests build adapters too.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
from array import array
from pathlib import Path

LAYERS = 2
HIDDEN = 128  # the tiny model's hidden size (tools/tiny_model.py)
MODULES = ("q_proj", "v_proj")


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], array]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for name, (shape, values) in tensors.items():
        data = values.tobytes()
        header[name] = {"dtype": "F32", "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def build(out: Path, seed: int = 1, rank: int = 8, hidden: int = HIDDEN,
          base: str = "tiny-chat") -> Path:
    """Write an adapter to `out`; `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def noise(count: int) -> array:
        return array("f", (rng.gauss(0.0, 0.5) for _ in range(count)))

    tensors: dict[str, tuple[list[int], array]] = {}
    for layer in range(LAYERS):
        for module in MODULES:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = ([rank, hidden], noise(rank * hidden))
            tensors[f"{prefix}.lora_B.weight"] = ([hidden, rank], noise(hidden * rank))
    write_safetensors(out / "adapter_model.safetensors", tensors)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "lora_dropout": 0.0, "bias": "none", "target_modules": list(MODULES),
              "base_model_name_or_path": base, "fan_in_fan_out": False, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--base", default="tiny-chat")
    args = parser.parse_args()
    build(args.out, args.seed, args.rank, args.hidden, args.base)
    print(f"tiny_adapter: wrote {args.out} (rank {args.rank}, seed {args.seed})")


if __name__ == "__main__":
    main()
