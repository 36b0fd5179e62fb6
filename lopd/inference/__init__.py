"""Generation and scoring backends: vLLM (production) and transformers (reference)."""
