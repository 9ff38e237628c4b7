"""How a verdict is worded (verdicts.py judges): what the worker knows (Facts), the vocabulary
every verdict shares, and one function per failure that needs more than an f-string in the table.

The vocabulary names things as the user set them: the model by its variable
(`MODEL_NAME=org/name`), a vLLM flag by the variable that sets it (`--kv-cache-dtype` is
KV_CACHE_DTYPE, `--revision` is MODEL_REVISION), and vLLM's own text only quoted short and
masked. Everything here is pure.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from worker.settings.vllm_flags import ALIASES, FLAGS, OWNED, VLLM_VERSION, known_flag

VLLM = VLLM_VERSION  # the vLLM the image pins, named in verdicts about what it supports
IMAGE_CUDA = "13.0"  # the CUDA the pinned vLLM image is built for (README, "Create the endpoint")
QUOTE = 120  # characters of vLLM's own text quoted at most
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}")
_KEYED = re.compile(r"(?i)\b((?:\w+_)?(?:token|api[_-]?key|password|secret)\s*[=:]\s*)[^\s,;)]+")


@dataclass(frozen=True)
class Facts:
    """What the worker knows of the start that failed, to word a verdict in its settings."""

    model: str  # the model as the user gave it (MODEL_NAME or MODEL_PATH)
    max_model_len: int | None = None  # MAX_MODEL_LEN as given (None: vLLM's own choice)
    gpu_memory_utilization: float = 0.92
    tensor_parallel_size: int | None = None
    gpus: int = 0  # GPUs vLLM sees
    port: int = 8000  # where this vLLM was to listen (VLLM_PORT)
    token_given: bool = False  # HF_TOKEN is set
    revision: str | None = None  # MODEL_REVISION
    weights_bytes: int | None = None  # the weights' size on disk, when known


def mask(text: str) -> str:
    """`text` without anything that looks like a token (an hf_... value, token=...)."""
    return _KEYED.sub(r"\1***", _HF_TOKEN.sub("hf_***", text))


def quote(text: str, limit: int = QUOTE) -> str:
    """vLLM's text as a verdict may show it: one line, secrets masked, at most `limit` chars."""
    text = mask(" ".join(text.split()))
    return text if len(text) <= limit else text[:limit - 1].rstrip(" ,;") + "…"


@dataclass(frozen=True)
class Found:
    """A row's trigger found in vLLM's output: the match, all the output, and the facts."""

    match: re.Match[str]
    text: str  # all of vLLM's lines, cleaned by verdicts.py, one per line
    facts: Facts

    def __getitem__(self, name: str) -> str:
        """A named group of the trigger ("" when the trigger has no such group or it is unset)."""
        return (self.match.groupdict().get(name) or "").strip()

    def last(self, pattern: str) -> re.Match[str] | None:
        """The last match of `pattern` anywhere in the output: a figure near the error."""
        found = None
        for found in re.finditer(pattern, self.text, re.M):  # noqa: B007 (the last one is kept)
            pass
        return found


def model(facts: Facts, named: str | None = None) -> str:
    """The model as the user set it (`MODEL_NAME=org/name`), or the repo or folder vLLM named
    when that is another one (a tokenizer's, say)."""
    if named and named.rstrip("/") != facts.model.rstrip("/"):
        return quote(named, 100)
    kind = "MODEL_PATH" if facts.model.startswith(("/", ".", "~")) else "MODEL_NAME"
    return f"{kind}={quote(facts.model, 100)}"


def util(facts: Facts) -> str:
    return f"{facts.gpu_memory_utilization:g}"


def weights(facts: Facts, before: str = "; ", after: str = "") -> str:
    """`; the weights are 16.4 GB` when their size is known."""
    size = facts.weights_bytes
    return f"{before}the weights are {size / 1e9:.1f} GB{after}" if size else ""


def more_gpus(facts: Facts) -> str:
    """How to spread the model over more GPUs, in TENSOR_PARALLEL_SIZE's terms."""
    tp = facts.tensor_parallel_size or facts.gpus
    if facts.gpus > tp:
        return f"TENSOR_PARALLEL_SIZE={facts.gpus} to split it over this worker's {facts.gpus} GPUs"
    now = f", now {tp}" if tp else ""
    return f"more GPUs per worker with TENSOR_PARALLEL_SIZE set to their number{now}"


def choices(listed: str, limit: int = 150) -> str:
    """vLLM's list of accepted values, bare (`a, b, c`), cut to `limit` characters."""
    return quote(", ".join(x.strip(" '\"") for x in listed.split(",") if x.strip(" '\"")), limit)


def capability(value: str) -> str:
    """vLLM's compute capability as an int (80) the way NVIDIA writes it (8.0)."""
    return f"{int(value) // 10}.{int(value) % 10}"


def set_by(flag: str) -> tuple[str, str]:
    """A vLLM flag's variable in the worker's settings (its alias, its own name or, for the
    flags the worker sets itself, none) and where it can be set: `(KV_CACHE_DTYPE, "set by
    KV_CACHE_DTYPE or VLLM_EXTRA_ARGS")`."""
    found = known_flag(flag)
    if found is None:
        return flag, "in VLLM_EXTRA_ARGS"
    alias = next((name for name, target in ALIASES.items() if target == found.flag), None)
    variable = alias or found.variable
    if variable in OWNED:
        return found.flag, "the worker sets it itself: remove it from VLLM_EXTRA_ARGS"
    return variable, f"set by {variable} or VLLM_EXTRA_ARGS"


_TYPES = {"int": "a whole number", "float": "a number", "human_readable_int":
          "a whole number (32768, 32k or 32K)", "human_readable_int_or_auto":
          "a whole number (32768, 32k or 32K) or auto"}


def unknown_flag(f: Found) -> str:
    given = f["args"].split()
    flags = [arg.partition("=")[0] for arg in given if arg.startswith("-")]
    close = [m for flag in flags for m in difflib.get_close_matches(flag, FLAGS, 1, 0.8)]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    if not flags:
        return (f"vLLM {VLLM} was given arguments it does not take ({quote(f['args'], 80)}): "
                "check VLLM_EXTRA_ARGS (a switch takes no value: --x or --no-x).")
    return (f"vLLM {VLLM} has no flag {quote(' '.join(flags), 80)}{hint}: remove it from "
            "VLLM_EXTRA_ARGS or correct its spelling.")


def invalid_value(f: Found) -> str:
    variable, where = set_by(f["flag"])
    if f["ok"]:
        rule = f"one of {choices(f['ok'])}"
    else:
        rule = _TYPES.get(f["type"], f"of type {quote(f['type'], 40)}")
    return (f"{variable}={quote(f['val'], 60)} is not valid for vLLM's {f['flag']} ({where}): "
            f"it must be {rule}.")


def invalid_argument(f: Found) -> str:
    flag = re.search(r"argument (--[\w-]+)", f["msg"])
    where = f" ({set_by(flag[1])[1]})" if flag else " (VLLM_EXTRA_ARGS or a flag's variable)"
    return f"vLLM refused its command line: {quote(f['msg'], 160)}{where}."


def context_too_long(f: Found) -> str:
    limits = [float(x) for x in (f["derived"], f["mml"]) if re.fullmatch(r"[\d.]+", x)]
    limit = int(min(limits))
    return (f"MAX_MODEL_LEN={f['req']} is longer than {model(f.facts)} allows "
            f"({f['key']} {limit:,} in its config.json): set MAX_MODEL_LEN to {limit} or less, "
            "or unset it.")


def heads_not_divisible(f: Found) -> str:
    heads, most = int(f["heads"]), f.facts.gpus or int(f["heads"])
    fits = [str(n) for n in range(1, min(heads, most) + 1) if heads % n == 0]
    return (f"The model's {heads} attention heads cannot be split evenly over "
            f"TENSOR_PARALLEL_SIZE={f['tp']}: set TENSOR_PARALLEL_SIZE to a number that divides "
            f"{heads} ({', '.join(fits[:8])}).")


def tensor_parallel_too_large(f: Found) -> str:
    if f["nodes"] or f["n"]:
        nodes = len([n for n in f["nodes"].split(",") if n.strip()])
        return (f"TENSOR_PARALLEL_SIZE={f['n']} needs {f['n']} NUMA nodes on vLLM's CPU build, "
                f"and this machine allows {nodes}: set TENSOR_PARALLEL_SIZE to {nodes} or unset "
                "it.")
    world, gpus = f["world"], f["gpus"]
    tp = f.facts.tensor_parallel_size
    asked = (f"TENSOR_PARALLEL_SIZE={world}" if tp in (None, int(world))
             else f"TENSOR_PARALLEL_SIZE × PIPELINE_PARALLEL_SIZE ({world})")
    return (f"{asked} needs {world} GPUs, but this worker has {gpus}: set TENSOR_PARALLEL_SIZE "
            f"to at most {gpus} (unset, it uses every GPU), or give the endpoint {world} GPUs per "
            "worker.")


def quantization_mismatch(f: Found) -> str:
    q = quote(f["q"], 40)
    if f["cfg"]:
        return (f"QUANTIZATION={q}, but {model(f.facts)} is quantized with "
                f"{quote(f['cfg'], 40)}: unset QUANTIZATION (vLLM reads it from the model).")
    return (f"QUANTIZATION={q}, but {model(f.facts)} has no {q} quantization config (it is not "
            f"quantized with {q}): unset QUANTIZATION, or serve a variant of the model quantized "
            f"with {q}.")


def gated(f: Found) -> str:
    repo = _gated_repo(f)
    if f.facts.token_given:
        return (f"{model(f.facts, repo)} is a gated repository and the hub did not accept HF_TOKEN "
                f"for it: check that HF_TOKEN is valid and that its account accepted the terms at "
                f"https://huggingface.co/{repo}.")
    return (f"{model(f.facts, repo)} is a gated repository and HF_TOKEN is not set: accept its "
            f"terms at https://huggingface.co/{repo} and set HF_TOKEN to a token of that "
            "account.")


def gated_no_access(f: Found) -> str:
    repo = _gated_repo(f)
    return (f"HF_TOKEN's account has no access to the gated repository {model(f.facts, repo)}: "
            f"request it at https://huggingface.co/{repo} (or use a token of an account that "
            "has it).")


def _gated_repo(f: Found) -> str:
    found = (f.last(r"Make sure to have access to it at https?://[^/\s]+/(\S+?)\.?$")
             or f.last(r"Access to model (\S+) is restricted"))
    return quote(found[1] if found else f.facts.model, 100)


def revision_not_found(f: Found) -> str:
    named = f.last(r"model page at 'https?://[^/']+/([^']+)'")
    repo = quote(named[1] if named else f.facts.model, 100)
    rev = quote(f["rev"] or f.facts.revision or "?", 60)
    return (f"MODEL_REVISION={rev} is not a branch, tag or commit of {repo}: set MODEL_REVISION "
            "to one that exists (the repository's page lists them), or unset it for main.")


def repo_not_found(f: Found) -> str:
    private = ("HF_TOKEN's account has no access to it" if f.facts.token_given
               else "set HF_TOKEN to a token that can read it")
    return (f"{model(f.facts, f['repo'] or None)} is neither a model repository on Hugging Face "
            "nor a local folder: check its spelling (<org>/<name>, as on huggingface.co); if it "
            f"is private, {private}.")


def hub_unreachable(f: Found) -> str:
    endpoint = f["endpoint"]
    hub = f"The hub at {quote(endpoint, 80)}" if endpoint else "The Hugging Face hub"
    custom = " (check HF_ENDPOINT)" if endpoint and "huggingface.co" not in endpoint else ""
    return (f"{hub} could not be reached{custom} and {model(f.facts)} is not in the cache: a "
            "network problem that usually passes, so a restart retries; weights on the network "
            "volume do not depend on it.")


def local_path_missing(f: Found) -> str:
    path = quote(f["model"], 120)
    if f["model"].startswith(("/", ".", "~")):
        return (f"MODEL_PATH={path} does not exist (vLLM took it for a repo id): check the path "
                "and that the network volume is attached.")
    return (f"{path} is neither an existing folder nor a Hugging Face repo id (<org>/<name>): "
            "correct MODEL_NAME or MODEL_PATH.")


def disk_full(f: Found) -> str:
    warned = f.last(r"Not enough free disk space to download the file\. The expected file size "
                    r"is: (?P<need>[\d.]+) MB\. The target location (?P<dir>\S+) only has "
                    r"(?P<free>[\d.]+) MB free")
    if warned is None:
        return ("The disk is full (No space left on device), on the network volume or the "
                "container disk: free space or make the full one larger, or point HF_HOME at a "
                "larger disk.")
    where = warned["dir"]
    disk = ("the network volume" if where.startswith(("/runpod-volume", "/workspace"))
            else "the container disk")
    return (f"The disk is full (No space left on device): {quote(where, 120)} on {disk} has "
            f"{warned['free']} MB free for a {warned['need']} MB download: free space there or "
            "make it larger, or point HF_HOME at a larger disk.")


def tokenizer_unloadable(f: Found) -> str:
    if f["json"]:
        what = f"its tokenizer.json is not valid JSON ({quote(f['json'], 60)})"
    else:
        what = f"its tokenizer.json is not in a format this image reads ({quote(f['msg'], 70)})"
    return (f"The tokenizer of {model(f.facts)} cannot be loaded: {what}, most likely a damaged "
            "download: download the model again, or set TOKENIZER to a repository with a "
            "working one.")


_CPU_KV = r"Explicitly set \((?P<kv>[\d.]+)/(?P<total>[\d.]+)\) GiB for KV cache"


def kv_cache_too_small(f: Found) -> str:
    want = (f"MAX_MODEL_LEN={f['len']}" if f.facts.max_model_len is not None
            else f"The model's context of {f['len']} tokens (MAX_MODEL_LEN unset)")
    fix = (f"set MAX_MODEL_LEN to at most {f['est']}" if f["est"] else "lower MAX_MODEL_LEN")
    cpu = f.last(_CPU_KV)
    room = (f"raise VLLM_CPU_KVCACHE_SPACE (now {cpu['kv']} GiB)" if cpu else
            f"raise GPU_MEMORY_UTILIZATION (now {util(f.facts)}), set KV_CACHE_DTYPE=fp8 or use "
            "a GPU with more memory")
    return (f"{want} needs {f['need']} GiB of KV cache, but only {f['have']} GiB is left for it: "
            f"{fix}, or {room}.")


def no_kv_cache_memory(f: Found) -> str:
    cpu = f.last(_CPU_KV)
    if cpu:
        return (f"VLLM_CPU_KVCACHE_SPACE gives the KV cache {cpu['kv']} GiB of the node's "
                f"{cpu['total']} GiB: set VLLM_CPU_KVCACHE_SPACE to a size in GiB that fits, or "
                "unset it.")
    left = f.last(r"Available KV cache memory: (-?[\d.]+) GiB")
    figures = (f" ({left[1]} GiB available{weights(f.facts)})" if left
               else weights(f.facts, " (", ")"))
    what = ("Not even one token of context fits in GPU memory" if "auto-fit" in f.match[0]
            else "No GPU memory is left for the KV cache")
    return (f"{what} after loading {model(f.facts)}{figures}: raise GPU_MEMORY_UTILIZATION (now "
            f"{util(f.facts)}) if the GPU has room, or use a GPU with more memory, "
            f"{more_gpus(f.facts)}, or a quantized variant of the model.")


def other_process(f: Found) -> re.Match[str] | None:
    """Another process's memory on the GPU, as torch's OOM message lists it: only certain when
    it also names this process (in a container torch cannot tell its own PID from others')."""
    if f.last(r"this process has [\d.]+ \w+ memory in use"):
        return f.last(r"Process (?P<pid>\d+) has (?P<used>[\d.]+ \w+) memory in use")
    return None


def _gpu_figures(f: Found) -> str:
    oom = f.last(r"GPU (?P<gpu>\d+) has a total capacity of (?P<total>[\d.]+ \w+) of which "
                 r"(?P<free>[\d.]+ \w+) is free")
    if oom is None:
        return weights(f.facts, " (", ")")
    return f" (GPU {oom['gpu']}: {oom['total']}, {oom['free']} free{weights(f.facts)})"


def gpu_oom_loading(f: Found) -> str:
    other = other_process(f)
    if other:
        return _other_holds(f, other)
    return (f"{model(f.facts)} does not fit in GPU memory{_gpu_figures(f)}: use a GPU with more "
            f"memory, {more_gpus(f.facts)}, or a quantized variant of the model.")


def gpu_oom(f: Found) -> str:
    other = other_process(f)
    if other:
        return _other_holds(f, other)
    return (f"The GPU ran out of memory during start-up{_gpu_figures(f)}: lower "
            f"GPU_MEMORY_UTILIZATION (now {util(f.facts)}) to leave more room outside the KV "
            "cache, lower MAX_MODEL_LEN or MAX_NUM_SEQS, set ENFORCE_EAGER=true (no CUDA "
            "graphs), or use a GPU with more memory.")


def _other_holds(f: Found, other: re.Match[str]) -> str:
    return (f"The GPU ran out of memory{_gpu_figures(f)} because another process (PID "
            f"{other['pid']}, often a vLLM left from an earlier start) holds {other['used']} of "
            "it: a restart usually passes once it is gone.")


def _fits(free: str, total: str) -> str:
    return f"{math.floor(float(free) / float(total) * 100) / 100:g}"


def gpu_memory_in_use(f: Found) -> str:
    return (f"Only {f['free']} of the GPU's {f['total']} GiB is free at start, less than "
            f"GPU_MEMORY_UTILIZATION={f['util']} asks for ({f['want']} GiB): another process "
            "holds GPU memory (often a vLLM from an earlier start, still stopping), so a restart "
            "usually passes; if it stays, lower GPU_MEMORY_UTILIZATION to "
            f"{_fits(f['free'], f['total'])} or less.")


def cpu_memory_in_use(f: Found) -> str:
    return (f"Only {f['free']} of the node's {f['total']} GiB of RAM is free at start, less than "
            f"GPU_MEMORY_UTILIZATION={f['util']} reserves on vLLM's CPU build ({f['want']} GiB): "
            f"lower GPU_MEMORY_UTILIZATION to {_fits(f['free'], f['total'])} or less, or free RAM "
            "other processes use.")


def cuda_driver_too_old(f: Found) -> str:
    found = f.last(r"found version (\d+)\)")
    supports = (f", it supports CUDA {int(found[1]) // 1000}.{int(found[1]) % 1000 // 10}"
                if found else "")
    return (f"This host's NVIDIA driver is too old for (or does not match) the image's CUDA "
            f"{IMAGE_CUDA}{supports}: "
            "a restart may land on another host; to avoid such hosts, allow only CUDA "
            f"{IMAGE_CUDA} in the endpoint's CUDA version filter (Allowed CUDA versions).")


def gpu_arch_unsupported(f: Found) -> str:
    gpu = f.last(r"Found GPU\d+ (?P<name>.+?) which is of compute capability \(CC\) "
                 r"(?P<cc>\d+(?:\.\d+)?)")
    named = f"The GPU {quote(gpu['name'], 60)} (compute capability {gpu['cc']})" if gpu else (
        "This GPU type")
    return (f"{named} has no kernels in this image's build of PyTorch and vLLM: pick other GPU "
            "types for the endpoint, or use an image built for this one.")


def engine_killed(f: Found) -> str:
    return (f"vLLM's engine was killed (SIGKILL) while starting, with no error of its own: most "
            f"likely the out-of-memory killer, the worker's RAM running out while loading "
            f"{model(f.facts)}{weights(f.facts, ' (', ')')}; "
            "a restart may pass if the memory was short for a moment, otherwise use a worker "
            "with more RAM or a smaller model.")
