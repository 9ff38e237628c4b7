"""A request's way to vLLM and back: the job contract (contract), the shared pool and its
verdicts (proxy), stream pacing (relay), vLLM's stream formats (sse), the errors clients
receive (errors), and adapters loaded on demand (adapter_loader)."""
