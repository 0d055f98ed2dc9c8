"""Engines: `transformers` (embedded, step-level batching), `vllm` (supervised child process,
proxied) and `upstream` (a gateway to any OpenAI-compatible server)."""
