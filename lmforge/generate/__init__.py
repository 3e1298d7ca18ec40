"""Text generation: sampling, the KV-cache Engine, the pipeline API."""
