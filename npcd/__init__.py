"""npcd: one base LLM, a LoRA adapter per persona, mixed-adapter batches streamed to game NPCs."""

__version__ = "0.1.0"
