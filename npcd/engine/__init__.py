"""The inference engine: one base model, a LoRA per persona, continuous mixed-adapter batching.

This is the only package that imports torch, and only in its modules, not
here: `npcd.engine.api` (the backend interface and its types) and
`npcd.engine.config` (the engine definition) stay importable without torch,
so the daemon's service layer can use them before a model is loaded.
"""
