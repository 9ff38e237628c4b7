"""The figures the README's Reliability table states, as the tests that hold them use them
(project/test_readme.py checks the table against these)."""

from __future__ import annotations

import os

# robustness/test_load.py: concurrent streams, each of this many events.
STREAMS = 256
EVENTS = 2000
# robustness/test_fuzz.py: examples per property, and the hostile routes and raw paths it tries.
DEFAULT_EXAMPLES = 300  # per property; FUZZ_EXAMPLES sets another number
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or DEFAULT_EXAMPLES)


HOSTILE_ROUTES = [
    "/collective_rpc", "/collective_rpc/", "/sleep", "/wake_up", "/is_sleeping",
    "/reset_prefix_cache", "/reset_mm_cache", "/pause", "/resume", "/scale_elastic_ep",
    "/start_profile", "/stop_profile", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    "/metrics", "/health", "/ping", "/version", "/server_info", "/invocations",
    "/openapi.json", "/docs", "/v1/../collective_rpc", "/v1/chat/completions/../../sleep",
    "/./sleep", "/v1/./models", "//127.0.0.1:8000/sleep", "//evil.example/v1/models",
    "http://127.0.0.1:8000/sleep", "https://evil.example/v1/chat/completions",
    "/v1/chat%2Fcompletions", "/%2e%2e/sleep", "/%252e%252e/sleep", "/v1/models%00",
    "/v1/models\x00/../sleep", "/v1/chat/completions?x=1", "/v1/models?a=/sleep",
    "/v1/chat/completions#frag", "/v1/chat/completions;x=1", "/v1//chat/completions",
    "\\..\\sleep", "/v1\\chat\\completions", "\uff0fsleep", "/v1/chat/completions\n/sleep",
    "/v1/chat/completions /sleep", "/V1/Chat/Completions", " /v1/models", "v1/models",
    "/v1/responses/resp_x/../../sleep", "/v1/responses/../../sleep/cancel",
    "/v1/responses/resp_" + "a" * 129, "",
]


ENDPOINT_PATHS = [
    "../../collective_rpc", "..%2F..%2Fcollective_rpc", "%2e%2e/%2e%2e/sleep", "../sleep",
    "./../reset_prefix_cache", "load_lora_adapter", "unload_lora_adapter", "start_profile",
    "chat/completions/../../../sleep", "chat%2Fcompletions%2F..%2F..%2Fsleep",
    "%252e%252e/sleep", "/collective_rpc", "//evil.example/v1/models",
    "http://evil.example/sleep", "chat/completions%3Fx=1/../../sleep",
]

# serve/test_http_front.py: request bodies sent with their head in one write, to both servers.
ONE_WRITE_BODIES = (70_000, 100_000, 1_000_000, 10_000_000)
