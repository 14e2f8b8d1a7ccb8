"""Personas: the YAML files designers edit, the template language and prompt building.

Torch-free: `npcd personas check` and the daemon's persona registry load
these without starting a model.
"""
