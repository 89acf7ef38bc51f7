"""The offline engine (`LLM`): scheduler, batching, parity, loading, tensor parallelism."""
