"""Stand-ins for the two things the worker talks to: vLLM's OpenAI server (`fakes.vllm`) and
Runpod's job API (`fakes.platform`).

The tests and the benchmarks share them, so both exercise the worker against the same
protocol; they are never shipped in the image (.dockerignore keeps this folder out).
"""
