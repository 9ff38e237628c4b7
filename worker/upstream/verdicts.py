r"""A verdict on a vLLM that failed to start: one sentence, in the worker's own settings.

`judge(lines, facts)` reads vLLM's output as the worker kept it (VllmChild's lines, oldest
first) and names what went wrong, the setting to change (MAX_MODEL_LEN, HF_TOKEN,
TENSOR_PARALLEL_SIZE, ...: the variables of worker/settings, where every `vllm serve` flag is
one by its upper-case name) and the figures vLLM gave that decide it. None when the failure is
not one it knows: the caller then quotes vLLM's last lines, as before. It is pure: text in,
text out, no process, no file.

Reading the lines: `\r` splits a line (tqdm bars, the banner's `\r\n`); the prefix vLLM puts on
every line of a process (`(EngineCore pid=N) ERROR 12-03 10:11:12 [core.py:1510] `) is taken
off; the table's rows are matched against the error lines alone, not INFO/WARNING lines,
traceback frames or the source lines under them, while their figures may come from any line
(`Available KV cache memory: ...` is an INFO line). The generic lines every engine failure
ends with ("Engine core initialization failed", "WorkerProc initialization failed", a broken
pipe from the orphaned worker, leaked-object noise) match no row, so the root cause logged above
them decides. A start that reached `Application startup complete` was healthy: never a verdict
(a start-up ERROR such as a chat template that does not compile is not fatal). The root cause of
an engine-side failure is logged up to ~125 lines before the end of vLLM's output (the worker's
traceback, then the engine's and the API server's): the caller keeps TAIL_NEEDED lines.

`permanent` is True when a restart with the same settings cannot succeed: a setting vLLM
refuses, a context or model that does not fit the memory, a repository that is gated, missing
or private, a revision that does not exist, a model this vLLM cannot serve, weights missing or
damaged on the volume, a full disk. False when the cause lies outside the settings and may
pass: another process on the GPU, the network, the host (its driver, no GPU: a restart may land
on another host), a port still held by a stopping vLLM. Judgement calls:
- an engine killed by SIGKILL is transient: the OOM killer is the likely hand, but nothing in
  the output proves it, and the sentence says what to change if it recurs;
- a GPU type that cannot do what is asked (bfloat16 below compute capability 8.0, no kernels
  for it, a quantization it lacks) is permanent: the endpoint's GPU types are its settings;
- CUDA out of memory is permanent unless torch's message names another process beside this one;
  free GPU memory below GPU_MEMORY_UTILIZATION is transient (usually a vLLM still stopping); on
  vLLM's CPU build the same check is permanent above 0.9 (the RAM the system itself uses is never
  free), and a KV cache asked larger than the node's RAM is permanent;
- a local path that does not exist is permanent (an unattached volume is endpoint settings);
- on the CPU build with VLLM_CPU_KVCACHE_SPACE set, the KV cache's size is that variable, not
  GPU_MEMORY_UTILIZATION: the verdict names it.
Sentences quote vLLM's own text only cut short and masked (`hf_...` tokens, `token=...`), and
never exceed MAX_SENTENCE characters.

The failures known are data, the table ROWS at the end: a row is the cause's stable name, the
regexes that recognise it (any of them; vLLM 0.32's own wording, from its output or its source),
optionally a regex the rest of the output must hold too, how to word it (verdict_words.py, or
an f-string in the row) and whether it is permanent (or a function of what was found). The
first row that matches wins: a specific row comes before a general one that would match the
same lines (the sampler's "CUDA out of memory occurred ..." before any CUDA out of memory).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.upstream import verdict_words as w
from worker.upstream.verdict_words import (
    VLLM,
    Facts,
    Found,
    capability,
    choices,
    mask,
    model,
    quote,
    util,
)

MAX_SENTENCE = 400
# vLLM's last lines judge needs: an engine-side root cause is logged up to ~125 lines before the
# end, the disk-space warning with its figures up to ~235.
TAIL_NEEDED = 250
# On vLLM's CPU build GPU_MEMORY_UTILIZATION reserves the node's RAM, which the system and the
# worker share: above this fraction no restart finds that much free, below it one may.
CPU_UTIL_REACHABLE = 0.9


@dataclass(frozen=True)
class Verdict:
    cause: str  # short, stable name: "context-too-long", "kv-cache-too-small", ...
    sentence: str  # one sentence: what is wrong, the setting(s) to change, the deciding figures
    permanent: bool  # a restart cannot fix it (see the module's docstring)


def judge(lines: Sequence[str], facts: Facts) -> Verdict | None:
    """The verdict on vLLM's output (its lines as the worker kept them, oldest first), or None
    for a failure not known (the caller then quotes vLLM's last lines as today)."""
    read = _read(lines)
    if read is None:
        return None
    everything, errors = read
    for row in ROWS:
        if row.needs is not None and not row.needs.search(everything):
            continue
        for trigger in row.triggers:
            match = _last(trigger, errors)
            if match is not None:
                found = Found(match, everything, facts)
                permanent = (row.permanent if isinstance(row.permanent, bool)
                             else row.permanent(found))
                return Verdict(row.cause, _sentence(row.word(found)), permanent)
    return None


# "(EngineCore pid=N) ERROR 12-03 10:11:12 [core.py:1510] ", and uvicorn's "INFO:     ".
_PREFIX = re.compile(r"^\([\w.-]+ pid=\d+\) (?P<level>[A-Z]+) \d\d-\d\d [\d:]{8} \[[^\]]*\] ?")
_UVICORN = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL):\s+")
_QUIET = frozenset({"DEBUG", "INFO", "WARNING"})
_FRAME = re.compile(r'^\s+File "')
_CODE = re.compile(r"^\s{4,}\S")  # a frame's source line
_CARETS = re.compile(r"^\s*[~^]+\s*$")
_HEALTHY = re.compile(r"Application startup complete|Uvicorn running on")
LONGEST = 20_000  # characters of one line read (the unknown-architecture line has 10,678)


def _read(lines: Sequence[str]) -> tuple[str, str] | None:
    """vLLM's lines as two texts, one line each: all of them without their prefixes (figures
    come from there) and the error lines alone (rows match those); None for a healthy start."""
    everything: list[str] = []
    errors: list[str] = []
    after_frame = False
    for raw in lines:
        for piece in raw.split("\r"):
            piece = piece.rstrip()[:LONGEST]
            if _HEALTHY.search(piece):
                return None
            prefix = _PREFIX.match(piece) or _UVICORN.match(piece)
            body = piece[prefix.end():] if prefix else piece
            if _CARETS.match(body) or (after_frame and _CODE.match(body)):
                after_frame = False
                continue
            after_frame = bool(_FRAME.match(body))
            everything.append(body)
            if not after_frame and not (prefix and prefix["level"] in _QUIET):
                errors.append(body)
    return "\n".join(everything), "\n".join(errors)


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    found = None
    for found in pattern.finditer(text):  # noqa: B007 (the last one is the one kept)
        pass
    return found


def _sentence(text: str) -> str:
    """One line, masked, at most MAX_SENTENCE characters."""
    text = mask(" ".join(text.split()))
    return text if len(text) <= MAX_SENTENCE else text[:MAX_SENTENCE - 1].rstrip() + "…"


@dataclass(frozen=True)
class Row:
    cause: str
    triggers: tuple[re.Pattern[str], ...]
    word: Callable[[Found], str]
    permanent: bool | Callable[[Found], bool]
    needs: re.Pattern[str] | None = None  # must be somewhere in the output as well


def _row(cause: str, triggers: str | tuple[str, ...], word: Callable[[Found], str],
         permanent: bool | Callable[[Found], bool], needs: str | None = None) -> Row:
    patterns = (triggers,) if isinstance(triggers, str) else triggers
    return Row(cause, tuple(re.compile(p, re.M) for p in patterns), word, permanent,
               re.compile(needs, re.M) if needs else None)


_ARGPARSE = r"^(?:api_server\.py|vllm serve|vllm): error: "
_FLAG = r"argument (?P<flag>--[\w-]+)(?:/-[\w-]+)*: "
_OOM = (r"Tried to allocate (?P<req>[\d.]+ \w+)\. GPU (?P<gpu>\d+) has a total capacity of "
        r"(?P<total>[\d.]+ \w+) of which (?P<free>[\d.]+ \w+) is free")

ROWS: tuple[Row, ...] = (
    # vLLM's command line (argparse: the last line, after the usage text).
    _row("unknown-flag", _ARGPARSE + r"unrecognized arguments: (?P<args>.+)$", w.unknown_flag,
         True),
    _row("invalid-flag-value", (
        _ARGPARSE + _FLAG + r"invalid choice: '(?P<val>[^']*)' \(choose from (?P<ok>.*)\)$",
        _ARGPARSE + _FLAG + r"invalid (?P<type>[\w ]+?) value: '(?P<val>[^']*)'"),
        w.invalid_value, True),
    _row("invalid-argument", _ARGPARSE + r"(?P<msg>.+)$", w.invalid_argument, True),
    # The worker's settings that vLLM checks itself.
    _row("context-too-long", r"User-specified max_model_len \((?P<req>\d+)\) is greater than "
         r"the derived max_model_len \((?P<key>\w+)=(?P<derived>[\d.]+) or "
         r"model_max_length=(?P<mml>[\w.]+)", w.context_too_long, True),
    _row("batched-tokens-below-context", r"max_num_batched_tokens \((?P<bt>\d+)\) is smaller "
         r"than max_model_len \((?P<ml>\d+)\)", lambda f: (
             f"MAX_NUM_BATCHED_TOKENS={f['bt']} is below the context length ({f['ml']} tokens) "
             f"with chunked prefill off: raise MAX_NUM_BATCHED_TOKENS to at least {f['ml']}, set "
             f"MAX_MODEL_LEN to at most {f['bt']}, or turn chunked prefill on "
             "(ENABLE_CHUNKED_PREFILL=true)."), True),
    _row("heads-not-divisible", r"Total number of attention heads \((?P<heads>\d+)\) must be "
         r"divisible by tensor parallel size \((?P<tp>\d+)\)", w.heads_not_divisible, True),
    _row("tensor-parallel-too-large", (
        r"World size \((?P<world>\d+)\) is larger than the number of available GPUs "
        r"\((?P<gpus>\d+)\)",
        r"Not enough allowed NUMA nodes to bind threads of (?P<n>\d+) local CPUWorkers\. "
        r"Allowed NUMA nodes are \[(?P<nodes>[^\]]*)\]"), w.tensor_parallel_too_large, True),
    _row("quantization-unknown", r"Unknown quantization method: (?P<q>\S+)\. Must be one of "
         r"\[(?P<ok>[^\]]*)", lambda f: (
             f"QUANTIZATION={quote(f['q'], 40)} is not a quantization method vLLM {VLLM} knows: "
             "unset QUANTIZATION (vLLM reads a quantized model's method from its config) or "
             f"use one of {choices(f['ok'])}."), True),
    _row("quantization-mismatch", (
        r"Cannot find the config file for (?P<q>[\w-]+)",
        r"Quantization method specified in the model config \((?P<cfg>[^)]*)\) does not match "
        r"the quantization method specified in the .quantization. argument \((?P<q>[^)]*)\)"),
        w.quantization_mismatch, True),
    _row("quantization-unsupported-gpu", r"The quantization method (?P<q>\S+) is not supported "
         r"for the current GPU\. Minimum capability: (?P<min>\d+)\. Current capability: "
         r"(?P<cur>\d+)", lambda f: (
             f"This GPU (compute capability {capability(f['cur'])}) cannot run the "
             f"{quote(f['q'], 40)} quantization, which needs {capability(f['min'])} or newer: "
             "pick a newer GPU type for the endpoint, or serve a variant of the model quantized "
             "another way (QUANTIZATION)."), True),
    _row("dtype-unsupported-by-quantization", r"(?P<dtype>torch\.\w+) is not supported for "
         r"quantization method (?P<q>\S+)\. Supported dtypes: \[(?P<ok>[^\]]*)\]", lambda f: (
             f"The {quote(f['q'], 40)} quantization cannot compute in "
             f"{f['dtype'].removeprefix('torch.')}: set DTYPE to a dtype it supports "
             f"({choices(f['ok'].replace('torch.', ''))})."), True),
    _row("load-format-unknown", r"Load format `(?P<fmt>[^`]+)` is not supported", lambda f: (
        f"LOAD_FORMAT={quote(f['fmt'], 40)} is not a load format vLLM {VLLM} knows: unset "
        "LOAD_FORMAT (auto) or use one of vLLM's (safetensors, pt, ...)."), True),
    _row("tool-parser-missing", r"--enable-auto-tool-choice requires --tool-call-parser",
         lambda f: ("ENABLE_AUTO_TOOL_CHOICE is on without a tool-call parser: set "
                    "TOOL_CALL_PARSER to the parser of the model's family (hermes, llama3_json, "
                    "openai, ...), or set ENABLE_AUTO_TOOL_CHOICE=false."), True),
    _row("tool-parser-unknown", r"invalid tool call parser: (?P<p>\S+) \(chose from \{ ?"
         r"(?P<ok>[^}]*?) ?\}\)", lambda f: (
             f"TOOL_CALL_PARSER={quote(f['p'], 40)} is not a tool-call parser of vLLM {VLLM}: "
             f"set it to one of {choices(f['ok'])}, or to auto or off."), True),
    _row("reasoning-parser-unknown", r"Reasoning parser '(?P<p>[^']+)' not found\. Available "
         r"parsers: (?P<ok>[^\"\n]*)", lambda f: (
             f"REASONING_PARSER={quote(f['p'], 40)} is not a reasoning parser of vLLM {VLLM}: "
             f"set it to one of {choices(f['ok'])}, or to auto or off."), True),
    _row("chat-template-missing", r"chat template string \((?P<path>[^)]*)\) appears path-like,"
         r" but doesn't exist", lambda f: (
             f"CUSTOM_CHAT_TEMPLATE names a file that does not exist ({quote(f['path'])}): give "
             "the path of an existing template file, or the template text itself."), True),
    # Where the model comes from: the hub, the token, the cache.
    _row("invalid-token", r"Invalid credentials in Authorization header|Invalid user token",
         lambda f: ("HF_TOKEN is not a valid Hugging Face token (the hub answered 401, "
                    "invalid credentials): set HF_TOKEN to a current token of your account "
                    "(huggingface.co/settings/tokens), or unset it for a public model."), True),
    _row("gated-repo-no-access", (r"you are not in the authorized list", r"GatedRepoError: 403",
                                  r"access a gated repo\.\n.*\n403 Client Error"),
         w.gated_no_access, True),
    _row("gated-repo", (r"GatedRepoError", r"You are trying to access a gated repo",
                        r"Cannot access gated repo"), w.gated, True),
    _row("revision-not-found", (r"(?<!\S)(?P<rev>\S+) is not a valid git identifier \(branch name, "
                                r"tag name or commit id\)", r"RevisionNotFoundError"),
         w.revision_not_found, True),
    _row("repo-not-found", (r"(?<!\S)(?P<repo>\S+) is not a local folder and is not a valid model "
                            r"identifier", r"RepositoryNotFoundError|Repository Not Found for url"),
         w.repo_not_found, True),
    _row("offline-not-cached", r"outgoing traffic has been disabled|offline mode is enabled",
         lambda f: (
             f"HF_HUB_OFFLINE is set, but {model(f.facts)} is not in the Hugging Face cache "
             "under HF_HOME: put the weights on the volume first (README, step 3), or unset "
             "HF_HUB_OFFLINE to download them."), True),
    _row("hub-unreachable", (r"We couldn't connect to '(?P<endpoint>[^']+)' to load the files",
                             r"An error happened while trying to locate the file on the Hub"),
         w.hub_unreachable, False),
    _row("local-path-missing", r"Repo id must be in the form 'repo_name' or "
         r"'namespace/repo_name': '(?P<model>[^']+)'", w.local_path_missing, True),
    _row("no-model-config", r"Invalid repository ID or local directory specified: "
         r"'(?P<model>[^']+)'", lambda f: (
             f"{model(f.facts, f['model'])} has no config.json (nor a Mistral params.json), so "
             "vLLM cannot tell what model it is: point it at the folder or repository of the "
             "model itself (the one with config.json), or download it again if it is "
             "incomplete."), True),
    # What the model is: vLLM and Transformers must know it.
    _row("remote-code-required", r"The repository (?P<repo>\S+) contains custom code which must"
         r" be executed", lambda f: (
             f"{model(f.facts, f['repo'])} ships its own model code, which vLLM runs only with "
             "TRUST_REMOTE_CODE=true: set it if you trust that repository's code."), True),
    _row("unsupported-architecture", r"Model architectures \[(?P<archs>[^\]]*)\] are not "
         r"supported for now", lambda f: (
             f"vLLM {VLLM} cannot serve the architecture {choices(f['archs'], 100)} of "
             f"{model(f.facts)}: use an image with a newer vLLM that supports it, or another "
             "model; if the repository ships its own code, TRUST_REMOTE_CODE=true with "
             "MODEL_IMPL=transformers may run it."), True),
    _row("unsupported-model-type", r"model type `(?P<mt>[^`]+)` but Transformers does not "
         r"recognize this architecture", lambda f: (
             f"The model type {quote(f['mt'], 60)} of {model(f.facts)} is unknown to the "
             f"Transformers of this image (vLLM {VLLM}): use an image with a newer vLLM, or "
             "set TRUST_REMOTE_CODE=true if the repository ships its own code."), True),
    # The files on the disk.
    _row("disk-full", r"\[Errno 28\] No space left on device", w.disk_full, True),
    _row("missing-weights", r"Cannot find any model weights with `(?P<model>[^`]+)`", lambda f: (
        f"{model(f.facts, f['model'])} has no weights vLLM can load (no *.safetensors, *.bin "
        "or *.pt files; the download is unfinished, or the repository holds another format "
        "such as GGUF): download it again, or check the model and LOAD_FORMAT."), True),
    _row("corrupt-weights", (r"SafetensorError: (?P<msg>.+)",
                             r"PytorchStreamReader failed reading zip archive.*"),
         lambda f: (
             f"A weights file of {model(f.facts)} is damaged "
             f"({quote(f['msg'] or f.match[0], 90)}), most likely a download cut short: delete "
             "the model's files from the volume and download it again."), True),
    _row("tokenizer-missing", r"Couldn't instantiate the backend tokenizer", lambda f: (
        f"{model(f.facts)} has no tokenizer this image can load (no tokenizer.json, and "
        "nothing it can convert one from): set TOKENIZER to the repository of the model's "
        "tokenizer, or add its tokenizer.json."), True),
    _row("tokenizer-unloadable", (
        r"data did not match any variant of untagged enum (?P<msg>\w+ at line \d+ column \d+)",
        r"JSONDecodeError: (?P<json>.+)"), w.tokenizer_unloadable, True,
        needs=r"tokenization_utils|tokenizers?[/.]|tokenizer\.json|TokenizerFast"),
    # Memory: the GPU's (or, on vLLM's CPU build, the node's RAM).
    _row("kv-cache-too-small", r"max seq len \((?P<len>\d+)\), \((?P<need>[\d.]+) GiB KV cache "
         r"is needed, which is larger than the available KV cache memory \((?P<have>-?[\d.]+) "
         r"GiB\)\.(?: Based on the available memory, the estimated maximum model length is "
         r"(?P<est>\d+))?", w.kv_cache_too_small, True),
    _row("no-kv-cache-memory", (r"No available memory for the cache blocks",
                                r"Cannot auto-fit max_model_len: not enough GPU memory"),
         w.no_kv_cache_memory, True),
    _row("gpu-oom-sampler-warmup", r"CUDA out of memory occurred when warming up sampler with "
         r"(?P<n>\d+) dummy requests", lambda f: (
             f"The GPU ran out of memory warming up the sampler for {f['n']} requests at once: "
             f"set MAX_NUM_SEQS below {f['n']}, or lower GPU_MEMORY_UTILIZATION (now "
             f"{util(f.facts)}) to leave more room outside the KV cache."), True),
    _row("gpu-oom-loading", r"Failed to load model - not enough GPU memory", w.gpu_oom_loading,
         lambda f: not w.other_process(f)),
    _row("gpu-oom", (r"OutOfMemoryError: CUDA out of memory", _OOM, r"CUDA error: out of memory"),
         w.gpu_oom, lambda f: not w.other_process(f)),
    _row("gpu-memory-in-use", r"Free memory on device (?P<dev>\S+) \((?P<free>[\d.]+)/"
         r"(?P<total>[\d.]+) GiB\) on startup is less than (?:desired GPU memory utilization|the "
         r"engine's budget after excluding external process's weights) \((?P<util>[\d.]+), "
         r"(?P<want>[\d.]+) GiB\)", w.gpu_memory_in_use, False),
    _row("cpu-memory-in-use", r"Available memory on node (?P<node>\d+) \((?P<free>[\d.]+)/"
         r"(?P<total>[\d.]+) GiB\) on startup is less than desired CPU memory utilization "
         r"\((?P<util>[\d.]+), (?P<want>[\d.]+) GiB\)", w.cpu_memory_in_use,
         lambda f: float(f["util"]) > CPU_UTIL_REACHABLE),
    _row("cpu-kv-cache-too-big", r"Available memory on node (?P<node>\d+) \((?P<free>[\d.]+)/"
         r"(?P<total>[\d.]+) GiB\) on kv cache allocation is less than requested memory for kv "
         r"\((?P<want>[\d.]+)", lambda f: (
             f"The KV cache asks for {f['want']} GiB of RAM, but only {f['free']} of the node's "
             f"{f['total']} GiB is free: lower VLLM_CPU_KVCACHE_SPACE (GiB) or "
             "KV_CACHE_MEMORY_BYTES, or unset both."),
         lambda f: float(f["want"]) > float(f["total"])),
    _row("memory-profiling-error", r"Error in memory profiling\. Initial free memory "
         r"(?P<init>[\d.]+) GiB, current free memory (?P<now>[\d.]+) GiB", lambda f: (
             "GPU memory changed while vLLM measured it (free at first "
             f"{f['init']} GiB, then {f['now']} GiB): another process on this GPU released "
             "memory meanwhile; a restart usually passes, and the GPU should not be shared."),
         False),
    # The host: its driver, its GPUs, the port.
    _row("cuda-driver-too-old", (
        r"The NVIDIA driver on your system is too old \(found version (?P<drv>\d+)\)",
        r"CUDA driver version is insufficient for CUDA runtime version",
        r"Error 803: system has unsupported display driver / cuda driver combination",
        r"forward compatibility was attempted on non supported HW",
        r"libcudart\.so\.\d+: cannot open shared object file"), w.cuda_driver_too_old, False),
    _row("no-gpu", (r"Failed to infer device type", r"No CUDA GPUs are available",
                    r"Found no NVIDIA driver on your system",
                    r"CUDA driver initialization failed, you might not have a CUDA gpu"),
         lambda f: ("vLLM found no GPU on this worker (the host gave it none, or "
                    "CUDA_VISIBLE_DEVICES hides them): a restart usually lands on a working "
                    "host; check that the endpoint asks for a GPU type."), False),
    _row("bfloat16-unsupported-gpu", r"Bfloat16 is only supported on GPUs with compute "
         r"capability of at least 8\.0\. Your (?P<gpu>.+?) GPU (?:has compute capability "
         r"(?P<cc>\d+(?:\.\d+)?)|does not have a compute capability)", lambda f: (
             f"The {quote(f['gpu'], 60)} GPU (compute capability {f['cc'] or 'unknown'}) cannot "
             "compute in bfloat16, which DTYPE (bfloat16 unless set) or the model asks for: set "
             "DTYPE=half, or pick GPU types of compute capability 8.0 or newer (A100, A10, L4, "
             "RTX 30xx and later)."), True),
    _row("gpu-arch-unsupported", r"no kernel image is available for execution on the device",
         w.gpu_arch_unsupported, True),
    _row("port-in-use", r"\[Errno 98\] Address already in use", lambda f: (
        f"Port {f.facts.port} (VLLM_PORT) is already in use, most likely by a vLLM left from an "
        "earlier start that is still stopping: a restart usually passes; if something else "
        "holds that port, set VLLM_PORT to a free one."), False),
    # Last: the engine killed with no error of its own (any row above explains more).
    _row("engine-killed", r"Failed core proc\(s\): \{[^}]*': -9\b", w.engine_killed, False),
)
