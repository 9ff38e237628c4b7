"""LoRA adapters: found the way weights are, checked before spawn, routed to their base.

Static adapters come from `LORA_MODULES`, in worker-vllm's form (a JSON list of
`{"name", "path", "base_model_name"}`) or vLLM's (`name=path`, several separated by
spaces or `;`). Each path is found as model weights are (model_locator.py): a folder as
given, a folder under `HF_HOME` of that name, or a hub repo id in the Hugging Face
caches (`HF_HOME/hub`, `HF_HUB_CACHE`, Runpod's), so nothing is downloaded. Its
`adapter_config.json` gives its rank and the base it was trained on. It goes to the
served model its `base_model_name` names, else the one its config's
`base_model_name_or_path` names, else the first. `MAX_LORA_RANK` is raised to the
largest adapter's rank when unset, and a clear error when set too low.

On-demand adapters live in `LORA_DIR`, one folder each, named as clients call them:
`check_on_demand` validates one before the worker loads it (requests/adapter_loader.py). Reading
files is all this module does.
"""

from __future__ import annotations

import json
import re
import shlex
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_locator import Location, find_in_caches
from worker.settings.loader import ModelSettings, Settings, SettingsError
from worker.settings.vllm_flags import FLAGS

RANKS = tuple(int(c) for c in FLAGS["--max-lora-rank"].choices or ("16",))
DEFAULT_RANK = 16  # vLLM's --max-lora-rank default
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names it and says why."""


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str  # its local folder
    base: str  # the served name of the model it goes to
    rank: int
    found: str  # where it was found, and why it goes to `base`


def read_adapter(folder: Path, name: str) -> dict[str, Any]:
    """The adapter's config, checked: the folder, adapter_config.json and weights."""
    if not folder.is_dir():
        raise AdapterError(f"LoRA adapter {name}: {folder} is not a folder")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except OSError:
        raise AdapterError(f"LoRA adapter {name}: {folder} has no adapter_config.json") from None
    except ValueError as exc:
        raise AdapterError(f"LoRA adapter {name}: its adapter_config.json is not JSON ({exc})"
                           ) from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"LoRA adapter {name}: adapter_config.json is not a LoRA config")
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise AdapterError(f"LoRA adapter {name}: {folder} has no {' or '.join(WEIGHTS)}")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"LoRA adapter {name}: adapter_config.json has no rank (r)")
    return config


# The input each projection takes: the model's hidden states, attention's output, the MLP's.
TAKES = {"q_proj": "hidden", "k_proj": "hidden", "v_proj": "hidden", "qkv_proj": "hidden",
         "gate_proj": "hidden", "up_proj": "hidden", "gate_up_proj": "hidden",
         "o_proj": "attention", "down_proj": "mlp"}


def input_sizes(folder: Path) -> dict[str, set[int]]:
    """The input sizes of the adapter's lora_A matrices, by what they take (safetensors
    header only: no weights are read)."""
    try:
        with (folder / WEIGHTS[0]).open("rb") as data:
            length = struct.unpack("<Q", data.read(8))[0]
            header = json.loads(data.read(min(length, 64 << 20)))
    except (OSError, ValueError, struct.error):
        return {}
    found: dict[str, set[int]] = {}
    for key, meta in header.items():
        module = key.removesuffix(".lora_A.weight").rsplit(".", 1)[-1]
        if key.endswith("lora_A.weight") and module in TAKES and isinstance(meta, dict) \
                and len(meta.get("shape", [])) == 2:
            found.setdefault(TAKES[module], set()).add(int(meta["shape"][1]))
    return found


def check_fits(folder: Path, name: str, model_sizes: dict[str, int], model: str) -> None:
    """Refuse an adapter trained for another architecture (its matrices' sizes)."""
    for takes, sizes in input_sizes(folder).items():
        expected = model_sizes.get(takes)
        if expected is not None and sizes != {expected}:
            raise AdapterError(f"LoRA adapter {name} was trained for another architecture: "
                               f"its {takes} projections take inputs of size "
                               f"{sorted(sizes)}, {model}'s take {expected}")


def model_sizes(location: Location) -> dict[str, int]:
    """The input size of each kind of projection, from the model's config.json."""
    if not location.is_local:
        return {}
    try:
        config = json.loads((Path(location.model) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    sizes = {"hidden": config.get("hidden_size"), "mlp": config.get("intermediate_size")}
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        sizes["attention"] = heads * head_dim
    return {k: v for k, v in sizes.items() if isinstance(v, int)}


def parse_modules(raw: str) -> list[dict[str, str | None]]:
    """LORA_MODULES as `{"name", "path", "base_model_name"}` items, or SettingsError."""
    text = raw.strip()
    if text.startswith(("[", "{")):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise SettingsError(f"LORA_MODULES is not valid JSON: {exc}.") from None
        items = parsed if isinstance(parsed, list) else [parsed]
        found = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                    or not isinstance(item.get("path"), str):
                raise SettingsError('LORA_MODULES must list {"name": ..., "path": ...} objects; '
                                    f"got {json.dumps(item)[:80]}.")
            base = item.get("base_model_name")
            found.append({"name": item["name"], "path": item["path"],
                          "base": base if isinstance(base, str) else None})
        return found
    found = []
    for part in shlex.split(text.replace(";", " ")):
        name, eq, path = part.partition("=")
        if not eq or not name or not path:
            raise SettingsError(f"LORA_MODULES has {part!r}: give name=path, or a JSON list "
                                'of {"name", "path", "base_model_name"}.')
        found.append({"name": name, "path": path, "base": None})
    return found


def locate_adapter(path: str, name: str, settings: Settings) -> tuple[Path, str]:
    """The adapter's folder and how it was found (without downloading), or SettingsError."""
    given = Path(path)
    if given.is_absolute() or path.startswith("."):
        if not given.exists():
            raise SettingsError(f"LoRA adapter {name}: {path} does not exist.")
        return given, f"LoRA adapter {name}: {given}"
    under_home = Path(settings.hf_home) / path
    if under_home.is_dir():
        return under_home, f"LoRA adapter {name}: {under_home} (in HF_HOME)"
    snapshot = find_in_caches(path, settings.hub_caches, "adapter_config.json")
    if snapshot is not None:
        return snapshot, f"LoRA adapter {name}: {path} in the cache, {snapshot}"
    raise SettingsError(f"LoRA adapter {name}: {path} is neither a folder nor a repo in the "
                        f"Hugging Face caches ({', '.join(settings.hub_caches)}); the worker "
                        "downloads no adapter: put it on the volume (hf download ...).")


def pick_base(name: str, wanted: str | None, trained_on: Any,
              models: Sequence[ModelSettings]) -> tuple[str, str]:
    """The served name of the model the adapter goes to, and why."""
    served = [m.served_name for m in models]
    if wanted is not None:
        for model in models:
            if wanted in (model.served_name, model.name, model.label):
                return model.served_name, f"base_model_name {wanted}"
        raise SettingsError(f"LoRA adapter {name} names the base {wanted!r}, which is not "
                            f"served here; served models: {', '.join(served)}.")
    if isinstance(trained_on, str):
        for model in models:
            if trained_on.rstrip("/") in (model.served_name, model.name, model.label,
                                          (model.path or "").rstrip("/")):
                return model.served_name, f"its adapter_config.json's base {trained_on}"
    return served[0], "the first model (no base named)"


@dataclass(frozen=True)
class LoraPlan:
    adapters: tuple[Adapter, ...]
    max_rank: int
    rank_reason: str | None  # set when the rank is raised for the adapters

    def for_model(self, served_name: str) -> list[Adapter]:
        return [a for a in self.adapters if a.base == served_name]


def plan(settings: Settings, located: Sequence[tuple[ModelSettings, Location]]) -> LoraPlan:
    """Every static adapter found, checked and routed; the LoRA rank; SettingsError."""
    models = [model for model, _ in located]
    locations = {model.served_name: location for model, location in located}
    adapters = []
    for item in parse_modules(settings.lora_modules) if settings.lora_modules else []:
        name = str(item["name"])
        if not SAFE_NAME.match(name) or name in {m.served_name for m in models}:
            raise SettingsError(f"LORA_MODULES: {name!r} cannot name an adapter (letters, "
                                "digits, . _ -, and not a served model's name).")
        folder, found = locate_adapter(str(item["path"]), name, settings)
        try:
            config = read_adapter(folder, name)
            base, why = pick_base(name, item["base"], config.get("base_model_name_or_path"),
                                  models)
            check_fits(folder, name, model_sizes(locations[base]), base)
        except AdapterError as exc:
            raise SettingsError(f"{exc}.") from None
        adapters.append(Adapter(name, str(folder), base, config["r"], f"{found}; to {base}: "
                                f"{why}; rank {config['r']}"))
    if len({a.name for a in adapters}) != len(adapters):
        raise SettingsError("LORA_MODULES names one adapter twice.")
    largest = max((a.rank for a in adapters), default=0)
    if settings.max_lora_rank is not None:
        if largest > settings.max_lora_rank:
            worst = max(adapters, key=lambda a: a.rank)
            raise SettingsError(too_high(worst.name, worst.rank, settings.max_lora_rank) + ".")
        return LoraPlan(tuple(adapters), settings.max_lora_rank, None)
    if largest <= DEFAULT_RANK:
        return LoraPlan(tuple(adapters), DEFAULT_RANK, None)
    rank = fitting_rank(largest)
    return LoraPlan(tuple(adapters), rank, f"MAX_LORA_RANK {rank}: the largest adapter's rank "
                                           f"is {largest} (vLLM's default is {DEFAULT_RANK})")


def fitting_rank(rank: int) -> int:
    """The smallest rank vLLM takes for --max-lora-rank that holds `rank`."""
    return next((r for r in RANKS if r >= rank), RANKS[-1])


def in_folder(lora_dir: str, name: str) -> bool:
    """Whether `name` is an adapter folder's name in LORA_DIR (a plain name only: never a
    path outside it)."""
    return bool(SAFE_NAME.match(name)) and (Path(lora_dir) / name).is_dir()


def check_on_demand(lora_dir: str, name: str, max_rank: int) -> tuple[Path, dict[str, Any]]:
    """An adapter folder of LORA_DIR (see `in_folder`) a request names, checked before it
    is loaded: its folder and config, or AdapterError."""
    folder = Path(lora_dir) / name
    config = read_adapter(folder, name)
    if config["r"] > max_rank:
        raise AdapterError(too_high(name, config["r"], max_rank, " this worker's"))
    return folder, config


def too_high(name: str, rank: int, max_rank: int, whose: str = "") -> str:
    return (f"LoRA adapter {name} has rank {rank}, above{whose} MAX_LORA_RANK={max_rank}: "
            f"set MAX_LORA_RANK to {fitting_rank(rank)} or more")
