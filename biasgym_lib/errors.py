"""Errors that tell the reader what to do next."""


class BiasGymError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


class ModelNotAvailable(BiasGymError):
    """The requested model cannot be found or loaded here."""


class UnsupportedModel(BiasGymError):
    """The model's architecture is not one the adapter knows."""


class ArtifactMismatch(BiasGymError):
    """A saved artifact does not belong to the model it is loaded into."""
