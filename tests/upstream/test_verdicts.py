"""judge() on vLLM 0.32's own output: each verdict from a real sample (tests/upstream/samples,
see its README), never a verdict on a healthy start or on noise, and sentences that are one
line, bounded and free of secrets. Pure: no process is started."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from worker.upstream.verdicts import MAX_SENTENCE, ROWS, TAIL_NEEDED, Facts, Verdict, judge

SAMPLES = Path(__file__).parent / "samples"
TINY = "/work/samples25/scratch/tiny"  # the CPU samples' MODEL_PATH
HUB = "someorg/tiny-chat"  # the stand-in hub's model
CPU = Facts(TINY, gpu_memory_utilization=0.3)  # the CPU samples ran with 0.3


def lines_of(name: str) -> list[str]:
    """A sample's lines as VllmChild keeps them: split on newlines, decoded, right-stripped
    (a `\\r` inside a line stays: judge() splits on it)."""
    raw = (SAMPLES / f"{name}.txt").read_bytes().decode("utf-8", errors="replace")
    return [line.rstrip() for line in raw.split("\n")]


@dataclass(frozen=True)
class Case:
    facts: Facts
    cause: str
    says: tuple[str, ...]  # settings and figures the sentence must name
    permanent: bool


C = Case
CASES: dict[str, Case] = {
    # argparse (the last line)
    "bad_flag": C(CPU, "unknown-flag", ("--not-a-flag", "VLLM_EXTRA_ARGS"), True),
    "bad_flag_value_dtype": C(CPU, "invalid-flag-value", ("DTYPE=bogus", "--dtype", "half"),
                              True),
    "bad_kv_cache_dtype": C(CPU, "invalid-flag-value",
                            ("KV_CACHE_DTYPE=bogus", "VLLM_EXTRA_ARGS", "fp8"), True),
    "bad_max_model_len_value": C(CPU, "invalid-flag-value", ("MAX_MODEL_LEN=32kk", "32K"), True),
    # settings vLLM checks itself
    "context_too_long": C(replace(CPU, max_model_len=4_000_000), "context-too-long",
                          ("MAX_MODEL_LEN=4000000", "32,768", "to 32768 or less"), True),
    "kv_cache_too_small": C(
        replace(CPU, model=TINY + "_longpos", max_model_len=9_000_000), "kv-cache-too-small",
        ("MAX_MODEL_LEN=9000000", "8.58 GiB", "1.0 GiB", "at most 1048448",
         "VLLM_CPU_KVCACHE_SPACE"), True),
    "batched_tokens_lt_max_len": C(CPU, "batched-tokens-below-context",
                                   ("MAX_NUM_BATCHED_TOKENS=1024", "32768", "MAX_MODEL_LEN"),
                                   True),
    "tp_heads_not_divisible": C(replace(CPU, tensor_parallel_size=4), "heads-not-divisible",
                                ("TENSOR_PARALLEL_SIZE=4", "2 attention heads", "(1, 2)"), True),
    "tp_more_than_cpus": C(replace(CPU, tensor_parallel_size=2), "tensor-parallel-too-large",
                           ("TENSOR_PARALLEL_SIZE=2", "NUMA", "allows 1"), True),
    "bad_quantization": C(CPU, "quantization-unknown", ("QUANTIZATION=bogus-quant", "awq"), True),
    "quantization_mismatch_awq": C(CPU, "quantization-mismatch",
                                   ("QUANTIZATION=awq", "unset QUANTIZATION"), True),
    "bad_load_format": C(CPU, "load-format-unknown", ("LOAD_FORMAT=bogus",), True),
    "auto_tool_choice_without_parser": C(CPU, "tool-parser-missing",
                                         ("TOOL_CALL_PARSER", "ENABLE_AUTO_TOOL_CHOICE"), True),
    "bad_tool_call_parser": C(CPU, "tool-parser-unknown", ("TOOL_CALL_PARSER=bogus", "apertus"),
                              True),
    "bad_reasoning_parser": C(CPU, "reasoning-parser-unknown",
                              ("REASONING_PARSER=bogus", "deepseek_r1"), True),
    "chat_template_missing_file": C(CPU, "chat-template-missing", (
        "CUSTOM_CHAT_TEMPLATE names a file that does not exist",
        "/work/samples25/scratch/nope/template.jinja"), True),
    # where the model comes from
    "gated_repo": C(Facts("someorg/gated-model"), "gated-repo", (
        "MODEL_NAME=someorg/gated-model", "HF_TOKEN is not set",
        "https://huggingface.co/someorg/gated-model"), True),
    "gated_repo_with_token": C(Facts("someorg/gated-model", token_given=True),
                               "gated-repo-no-access", ("HF_TOKEN", "request it at"), True),
    "invalid_token": C(Facts(HUB, token_given=True), "invalid-token", ("HF_TOKEN", "401"), True),
    "repo_not_found": C(Facts("someorg/missing-model"), "repo-not-found",
                        ("MODEL_NAME=someorg/missing-model", "set HF_TOKEN"), True),
    "revision_not_found": C(Facts(HUB, revision="nope"), "revision-not-found",
                            ("MODEL_REVISION=nope", HUB), True),
    "entry_not_found_config": C(Facts(HUB), "no-model-config",
                                (f"MODEL_NAME={HUB}", "config.json"), True),
    "offline_not_cached": C(Facts(HUB), "offline-not-cached",
                            ("HF_HUB_OFFLINE", f"MODEL_NAME={HUB}"), True),
    "hub_unreachable": C(Facts(HUB), "hub-unreachable",
                         ("http://127.0.0.1:18299", "HF_ENDPOINT", f"MODEL_NAME={HUB}"), False),
    "local_path_missing": C(Facts(TINY.replace("tiny", "does-not-exist")), "local-path-missing",
                            ("MODEL_PATH=/work/samples25/scratch/does-not-exist",), True),
    # what the model is
    "unknown_architecture": C(replace(CPU, model=TINY + "_fooarch"), "unsupported-architecture",
                              ("FooBarForCausalLM", "0.32.0", "TRUST_REMOTE_CODE"), True),
    "unknown_model_type": C(replace(CPU, model=TINY + "_footype"), "unsupported-model-type",
                            ("foobar", "0.32.0", "TRUST_REMOTE_CODE=true"), True),
    "trust_remote_code_required": C(replace(CPU, model=TINY + "_remote"), "remote-code-required",
                                    ("TRUST_REMOTE_CODE=true", f"MODEL_PATH={TINY}_remote"),
                                    True),
    # the files
    "missing_weights": C(replace(CPU, model=TINY + "_noweights"), "missing-weights",
                         (f"MODEL_PATH={TINY}_noweights", "safetensors"), True),
    "hub_no_weights": C(Facts(HUB), "missing-weights", (f"MODEL_NAME={HUB}", "safetensors"),
                        True),
    "corrupt_weights": C(replace(CPU, model=TINY + "_halfweights"), "corrupt-weights",
                         (f"MODEL_PATH={TINY}_halfweights", "incomplete metadata"), True),
    "bad_tokenizer": C(replace(CPU, model=TINY + "_badtok"), "tokenizer-unloadable",
                       ("tokenizer.json", "not valid JSON", "TOKENIZER"), True),
    "bad_tokenizer_schema": C(replace(CPU, model=TINY + "_badtok2"), "tokenizer-unloadable",
                              ("tokenizer.json", "ModelUntagged", "TOKENIZER"), True),
    "missing_tokenizer": C(replace(CPU, model=TINY + "_notok"), "tokenizer-missing",
                           ("TOKENIZER", "tokenizer.json"), True),
    "disk_full": C(Facts(HUB), "disk-full", ("No space left on device", "HF_HOME"), True),
    "disk_full_early": C(Facts(HUB), "disk-full", (
        "/mnt/x25/hf/hub/models--someorg--tiny-chat/blobs", "the container disk", "0.00 MB",
        "HF_HOME"), True),
    # memory, on vLLM's CPU build
    "cpu_no_kv_cache_memory": C(CPU, "no-kv-cache-memory", ("VLLM_CPU_KVCACHE_SPACE", "0.0 GiB"),
                                True),
    "cpu_memory_utilization_too_high": C(
        replace(CPU, gpu_memory_utilization=0.99), "cpu-memory-in-use",
        ("GPU_MEMORY_UTILIZATION=0.99", "19.91", "21.34", "to 0.93 or less"), True),
    "cpu_kvcache_space_too_big": C(CPU, "cpu-kv-cache-too-big",
                                   ("VLLM_CPU_KVCACHE_SPACE", "200.0 GiB", "14.78", "21.34"), True),
    # the host
    "port_in_use": C(replace(CPU, port=18109), "port-in-use", ("Port 18109", "VLLM_PORT"), False),
    "engine_core_killed": C(replace(CPU, weights_bytes=16_400_000_000), "engine-killed",
                            ("SIGKILL", "out-of-memory", "RAM", "16.4 GB"), False),
    "simulated_no_gpu_cuda_wheel": C(CPU, "no-gpu", ("no GPU",), False),
    # from vLLM's and torch's source: the rendered GPU examples
    "source_cuda_oom_loading_weights": C(
        Facts("Qwen/Qwen3-8B", gpus=1, weights_bytes=16_400_000_000), "gpu-oom-loading",
        ("MODEL_NAME=Qwen/Qwen3-8B", "15.70 GiB", "187.44 MiB free", "16.4 GB",
         "TENSOR_PARALLEL_SIZE", "quantized"), True),
    "source_kv_cache_too_small": C(
        Facts("meta-llama/Llama-3.1-8B-Instruct", max_model_len=131072,
              gpu_memory_utilization=0.9), "kv-cache-too-small",
        ("MAX_MODEL_LEN=131072", "16.0 GiB", "4.73 GiB", "at most 38736",
         "GPU_MEMORY_UTILIZATION (now 0.9)"), True),
    "source_no_kv_cache_memory": C(
        Facts("Qwen/Qwen3-14B", gpu_memory_utilization=0.9, gpus=1), "no-kv-cache-memory",
        ("-1.34 GiB", "GPU_MEMORY_UTILIZATION (now 0.9)", "TENSOR_PARALLEL_SIZE"), True),
    "source_gpu_free_memory_below_utilization": C(
        Facts("Qwen/Qwen3-8B", gpu_memory_utilization=0.9), "gpu-memory-in-use",
        ("GPU_MEMORY_UTILIZATION=0.9", "13.21", "23.55", "21.2 GiB", "to 0.56 or less"), False),
    "source_memory_profiling_error": C(Facts(HUB), "memory-profiling-error",
                                       ("38.12 GiB", "39.50 GiB"), False),
    "source_sampler_warmup_oom": C(Facts(HUB), "gpu-oom-sampler-warmup",
                                   ("MAX_NUM_SEQS", "1024", "GPU_MEMORY_UTILIZATION"), True),
    "source_tensor_parallel_larger_than_gpus": C(
        Facts(HUB, tensor_parallel_size=2, gpus=1), "tensor-parallel-too-large",
        ("TENSOR_PARALLEL_SIZE=2", "this worker has 1"), True),
    "source_heads_not_divisible_by_tp": C(
        Facts("Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=8, gpus=8),
        "heads-not-divisible", ("28 attention heads", "TENSOR_PARALLEL_SIZE=8", "(1, 2, 4, 7)"),
        True),
    "source_bfloat16_unsupported_gpu": C(Facts(HUB), "bfloat16-unsupported-gpu",
                                         ("DTYPE=half", "Tesla T4", "7.5"), True),
    "source_gpu_arch_not_supported": C(Facts(HUB), "gpu-arch-unsupported",
                                       ("NVIDIA GeForce RTX 5090", "12.0"), True),
    "source_cuda_driver_too_old": C(Facts(HUB), "cuda-driver-too-old",
                                    ("CUDA 12.4", "CUDA 13.0", "CUDA version filter"), False),
    "source_cuda_driver_803": C(Facts(HUB), "cuda-driver-too-old", ("CUDA version filter",),
                                False),
    "source_cuda_driver_insufficient": C(Facts(HUB), "cuda-driver-too-old",
                                         ("CUDA version filter",), False),
    "source_no_gpu_found": C(Facts(HUB), "no-gpu", ("no GPU",), False),
}
# Samples of starts that became healthy: never a verdict. bad_chat_template logs an ERROR and a
# TemplateSyntaxError traceback while starting, and every chat request fails later, but it starts.
HEALTHY = {"baseline_healthy", "baseline_healthy_local", "hub_download_ok",
           "kv_cache_autofit_healthy", "bad_chat_template"}
UNKNOWN: set[str] = set()  # samples judge() does not classify (yet): None, the last lines quoted


def check(verdict: Verdict | None, case: Case) -> None:
    assert verdict is not None, f"no verdict, expected {case.cause}"
    assert verdict.cause == case.cause, verdict
    for words in case.says:
        assert words in verdict.sentence, f"{words!r} missing from: {verdict.sentence}"
    assert verdict.permanent is case.permanent, verdict
    assert "\n" not in verdict.sentence and "\r" not in verdict.sentence
    assert len(verdict.sentence) <= MAX_SENTENCE, verdict.sentence
    assert verdict.sentence.endswith((".", "…")), verdict.sentence


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_sample_gives_its_verdict(name: str) -> None:
    check(judge(lines_of(name), CASES[name].facts), CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_root_cause_is_in_the_last_125_lines(name: str) -> None:
    """What TAIL_NEEDED rests on: an engine-side root cause sits up to ~125 lines before the end
    (the samples keep their last 130 lines; disk_full's earlier disk-space warning, 235 lines
    before the end, is left out, and disk_full_early has it)."""
    lines = lines_of(name)
    assert judge(lines[-125:], CASES[name].facts) == judge(lines, CASES[name].facts)
    assert TAIL_NEEDED >= 235


def test_every_sample_is_known() -> None:
    """A new sample is classified here, or listed as healthy or unknown: never forgotten."""
    on_disk = {path.stem for path in SAMPLES.glob("*.txt")}
    assert on_disk == set(CASES) | HEALTHY | UNKNOWN
    assert not set(CASES) & (HEALTHY | UNKNOWN)
    for name in UNKNOWN:
        assert judge(lines_of(name), CPU) is None


def test_every_row_is_tested() -> None:
    tested = {case.cause for case in CASES.values()} | {case.cause for _, case in WITHOUT_SAMPLE}
    assert {row.cause for row in ROWS} == tested


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_a_healthy_start_gives_none(name: str) -> None:
    lines = lines_of(name)
    assert judge(lines, CPU) is None
    # Nor without the line that says so: the shutdown that follows (EngineDeadError, leaked
    # objects) and a start-up ERROR that is not fatal match no row either.
    quiet = [line for line in lines if "Application startup complete" not in line]
    assert judge(quiet, CPU) is None


def test_a_non_fatal_error_while_starting_gives_none() -> None:
    """bad_chat_template up to the moment it became healthy: its ERROR lines are no verdict."""
    lines = lines_of("bad_chat_template")
    starting = lines[:next(i for i, line in enumerate(lines) if "startup complete" in line)]
    assert any(" ERROR " in line for line in starting)
    assert judge(starting, CPU) is None


@pytest.mark.parametrize("lines", [
    [],
    [""],
    ["\r", "   ", "^^^^^^^^^^"],
    ["RuntimeError: Engine core initialization failed. See root cause above. Failed core "
     "proc(s): {}"],
    ["(EngineCore pid=7) ERROR 12-03 10:11:12 [core.py:1510] Exception: WorkerProc "
     "initialization failed due to an exception in a background process. See stack trace for "
     "root cause.",
     "RuntimeError: Engine core initialization failed. See root cause above. Failed core "
     "proc(s): {'EngineCore': 1}"],
    ["(Worker pid=9) ERROR 12-03 10:11:12 [multiproc_executor.py:953] BrokenPipeError: [Errno "
     "32] Broken pipe", "nanobind: leaked 4 instances!",
     "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker:"
     " There appear to be 1 leaked shared_memory objects to clean up at shutdown"],
    # A failure's words in an INFO or WARNING line are not a failure.
    ["(Worker pid=9) WARNING 12-03 10:11:12 [x.py:1] Free memory on device cuda:0 (13.21/23.55 "
     "GiB) on startup is less than desired GPU memory utilization (0.9, 21.2 GiB)."],
    # Another signal than SIGKILL says nothing known: the last lines are quoted instead.
    ["RuntimeError: Engine core initialization failed. See root cause above. Failed core "
     "proc(s): {'EngineCore': -11}"],
])
def test_noise_alone_gives_none(lines: list[str]) -> None:
    assert judge(lines, CPU) is None


# Rows no sample was produced for, fed the text vLLM or torch builds (quoted from their source).
GPU = Facts("Qwen/Qwen3-8B", gpus=2, tensor_parallel_size=1, weights_bytes=16_400_000_000)
_ALLOC = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
          "total capacity of 23.55 GiB of which 1.10 GiB is free. ")
WITHOUT_SAMPLE: list[tuple[list[str], Case]] = [
    ([_ALLOC + "Including non-PyTorch memory, this process has 22.40 GiB memory in use. Of the "
      "allocated memory 21.9 GiB is allocated by PyTorch."],
     C(GPU, "gpu-oom", ("23.55 GiB", "1.10 GiB free", "ENFORCE_EAGER=true",
                        "GPU_MEMORY_UTILIZATION (now 0.92)"), True)),
    (["(Worker pid=1) ERROR 06-02 10:15:31 [gpu_model_runner.py:5147] Failed to load model - not "
      "enough GPU memory. Try lowering --gpu-memory-utilization ...", _ALLOC + "Process 4711 has "
      "10.00 GiB memory in use. Including non-PyTorch memory, this process has 12.40 GiB memory "
      "in use."],
     C(GPU, "gpu-oom-loading", ("another process", "10.00 GiB", "4711"), False)),
    (["(Worker pid=1) ERROR 06-02 10:15:31 [gpu_model_runner.py:5147] Failed to load model - not "
      "enough GPU memory. Try lowering --gpu-memory-utilization ...", _ALLOC],
     C(GPU, "gpu-oom-loading", ("TENSOR_PARALLEL_SIZE=2", "2 GPUs", "16.4 GB"), True)),
    (["ValueError: Cannot auto-fit max_model_len: not enough GPU memory available to serve even "
      "a single token. Try increasing `gpu_memory_utilization`."],
     C(GPU, "no-kv-cache-memory", ("Not even one token", "GPU_MEMORY_UTILIZATION"), True)),
    (["  Value error, Quantization method specified in the model config (fp8) does not match the "
      "quantization method specified in the `quantization` argument (awq). [type=value_error, "
      "input_value=ArgsKwargs((), {...}), input_type=ArgsKwargs]"],
     C(GPU, "quantization-mismatch", ("QUANTIZATION=awq", "fp8"), True)),
    (["  Value error, The quantization method fp8 is not supported for the current GPU. Minimum "
      "capability: 89. Current capability: 80. [type=value_error, input_value=..."],
     C(GPU, "quantization-unsupported-gpu", ("fp8", "8.9", "8.0"), True)),
    (["  Value error, torch.bfloat16 is not supported for quantization method awq. Supported "
      "dtypes: [torch.float16] [type=value_error, input_value=..."],
     C(GPU, "dtype-unsupported-by-quantization", ("DTYPE", "float16", "awq"), True)),
    (["RuntimeError: No CUDA GPUs are available"], C(GPU, "no-gpu", ("no GPU",), False)),
    (["api_server.py: error: argument --tensor-parallel-size/-tp: invalid int value: 'two'"],
     C(GPU, "invalid-flag-value", ("TENSOR_PARALLEL_SIZE=two", "a whole number"), True)),
    (["api_server.py: error: unrecognized arguments: --max-model-lenght 8192"],
     C(GPU, "unknown-flag", ("--max-model-lenght", "did you mean --max-model-len?"), True)),
    (["api_server.py: error: argument --revision: expected one argument"],
     C(GPU, "invalid-argument", ("MODEL_REVISION", "expected one argument"), True)),
    (["(Worker pid=3) ERROR 06-02 10:15:31 [multiproc_executor.py:953] RuntimeError: CUDA error: "
      "no kernel image is available for execution on the device"],
     C(GPU, "gpu-arch-unsupported", ("This GPU type",), True)),
]


# Other wordings of a known failure, as vLLM, torch, CUDA or huggingface_hub print them.
OTHER_WORDINGS: list[tuple[str, str]] = [
    ("huggingface_hub.errors.HfHubHTTPError: 401 Client Error: Invalid user token.",
     "invalid-token"),
    ("huggingface_hub.errors.OfflineModeIsEnabled: Cannot reach https://huggingface.co/api/models/"
     "org/m: offline mode is enabled. To disable it, please unset the `HF_HUB_OFFLINE` environment "
     "variable.", "offline-not-cached"),
    ("RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central "
     "directory", "corrupt-weights"),
    ("ImportError: libcudart.so.13: cannot open shared object file: No such file or directory",
     "cuda-driver-too-old"),
    ("RuntimeError: CUDA error: forward compatibility was attempted on non supported HW",
     "cuda-driver-too-old"),
    ("RuntimeError: CUDA error: out of memory", "gpu-oom"),
    ("RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA "
     "GPU and installed a driver from http://www.nvidia.com/Download/index.aspx", "no-gpu"),
    ("RuntimeError: CUDA driver initialization failed, you might not have a CUDA gpu.", "no-gpu"),
]


@pytest.mark.parametrize(("line", "cause"), OTHER_WORDINGS)
def test_other_wordings_of_a_known_failure(line: str, cause: str) -> None:
    verdict = judge([line], GPU)
    assert verdict is not None and verdict.cause == cause


def test_every_trigger_of_every_row_is_exercised() -> None:
    """Each regex of each row matches some sample or some line above: none is dead."""
    texts = ["\n".join(lines_of(name)).replace("\r", "\n") for name in CASES]
    texts += ["\n".join(lines) for lines, _ in WITHOUT_SAMPLE]
    texts += [line for line, _ in OTHER_WORDINGS]
    dead = [f"{row.cause}: {trigger.pattern}" for row in ROWS for trigger in row.triggers
            if not any(trigger.search(text) for text in texts)]
    assert dead == []


@pytest.mark.parametrize(("lines", "case"), WITHOUT_SAMPLE,
                         ids=[f"{case.cause}-{i}" for i, (_, case) in enumerate(WITHOUT_SAMPLE)])
def test_rows_without_a_sample(lines: list[str], case: Case) -> None:
    check(judge(lines, case.facts), case)


def test_carriage_returns_and_prefixes_are_read_through() -> None:
    """A tqdm bar and the root cause on one line, split at `\\r`; the prefix taken off."""
    line = ("Loading safetensors checkpoint shards: 100% Completed | 1/1\r(EngineCore pid=5) ERROR "
            "12-03 10:11:12 [core.py:1510] ValueError: No available memory for the cache blocks.")
    verdict = judge([line], Facts(HUB, gpus=1))
    assert verdict is not None and verdict.cause == "no-kv-cache-memory"


def test_a_huge_line_is_quoted_short() -> None:
    archs = ", ".join(f"'Arch{i}ForCausalLM'" for i in range(5000))
    line = (f"  Value error, Model architectures ['{'X' * 5000}ForCausalLM'] are not supported for "
            f"now. Supported architectures: dict_keys([{archs}]) [type=value_error, ...]")
    verdict = judge([line], Facts(HUB))
    assert verdict is not None and verdict.cause == "unsupported-architecture"
    assert len(verdict.sentence) <= MAX_SENTENCE and "…" in verdict.sentence


TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456"


@pytest.mark.parametrize("line", [
    f"OSError: {TOKEN} is not a valid git identifier (branch name, tag name or commit id) that "
    "exists for this model name. Check the model page at 'https://huggingface.co/org/m' for "
    "available revisions.",
    f"api_server.py: error: unrecognized arguments: --hf-tokn={TOKEN}",
    f"api_server.py: error: argument --dtype: invalid choice: '{TOKEN}' (choose from 'auto')",
    f"api_server.py: error: argument --max-model-len: invalid int value: 'token={TOKEN[3:]}'",
    f"vllm.exceptions.VLLMValidationError: The supplied chat template string (/v/{TOKEN}/t.jinja)"
    " appears path-like, but doesn't exist! Tried: ...",
    f"KeyError: 'invalid tool call parser: {TOKEN} (chose from {{ hermes,openai }})'",
    f"OSError: {TOKEN}/model is not a local folder and is not a valid model identifier listed on "
    "'https://huggingface.co/models'",
])
def test_a_secret_in_the_lines_never_reaches_the_sentence(line: str) -> None:
    verdict = judge([line], Facts(f"org/{TOKEN}", revision=TOKEN))
    assert verdict is not None
    assert TOKEN not in verdict.sentence and TOKEN[3:] not in verdict.sentence
