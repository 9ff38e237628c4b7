"""Settings: every variable declared once (table), read and validated in one pass (loader),
vLLM's own flags as data (vllm_flags + its JSON), the config file, misspelt names."""
