"""tunedesk.serve: the OpenAI-compatible server (`tunedesk serve`).

Layout (one job per module):

- `app.create_app(settings, engine)`: assembles the FastAPI app (CLI and tests alike).
- `routes` (thin) -> `service` (auth scopes, admission/429, hand-off) -> an `Engine`.
- `engines/base.Engine`: the interface. `engines/local/` is the embedded transformers engine
  (step-level continuous batching in a worker thread); `engines/proxy.ProxyEngine` forwards raw
  bytes to any OpenAI-compatible upstream; `engines/vllm.VLLMEngine` supervises a `vllm serve`
  child and proxies to it.
- `registry.ModelRegistry`: served names -> weights; register more at runtime, loaded lazily.
- `protocol` (wire models), `errors` (OpenAI error shapes), `auth` (key records with scopes),
  `admission`, `metrics`, `access_log`, `body_limit`, `streaming` (SSE, cleanup on disconnect),
  `settings` (TUNEDESK_* env), `model_ref` (--model / --lora), `commands` (the CLI),
  `testing.ServerThread` (a real server in a thread), `bench` (throughput script).
"""
