"""Exceptions whose messages are shown to users as they are.

Each message says what failed and what to do next; app.py turns them into gr.Error / gr.Warning.
"""


class LoraLensError(Exception):
    """Base class: the message is meant for a person, not a stack trace."""


class ProfileError(LoraLensError):
    """An unknown profile name or a setting that cannot be used."""


class ModelLoadError(LoraLensError):
    """A base model could not be loaded (missing package, gated, no network, out of memory ...)."""


class AdapterLoadError(LoraLensError):
    """A LoRA adapter is missing, corrupt, or made for another base."""


class InputError(LoraLensError):
    """A request argument is empty, out of range, or of the wrong type."""


class GenerationError(LoraLensError):
    """Generation failed or was interrupted; the model is free again."""


class ServingError(GenerationError):
    """A serving engine (a vLLM server) could not be reached, answered too slowly, or refused a request."""
