"""The embedded engine: transformers models in-process, step-level continuous batching."""
