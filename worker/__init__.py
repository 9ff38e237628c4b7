"""The worker: vLLM's OpenAI server as a supervised child, served to Runpod and its clients.

One wing per concern, each importing only from the wings below it (docs/architecture.md):
settings (what the deployment asked for) < launch (how each vLLM will start) < upstream
(the vLLM children's lives) < requests (a job or HTTP request to vLLM and back) < serve
(the servers and the process's life) < diagnose (the start-up diagnostic). `masking`
(secrets) sits below them all. The entry points are the top-level scripts.
"""
