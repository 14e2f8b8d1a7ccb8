"""The gRPC daemon: configuration, persona registry, request validation, the servicer, metrics and logs.

Torch-free: it talks to the engine only through `npcd.engine.api.Backend`,
so another backend can stand behind it, and the engine (and torch) is imported
only when a daemon actually starts one.
"""
