"""Errors raised while resolving and loading a model."""


class ModelLoadError(Exception):
    """A checkpoint could not be loaded; the message names the file or field at fault."""
