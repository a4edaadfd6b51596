"""User-facing errors. The CLI prints these as one clear message, never a stack trace."""


class GraftError(Exception):
    """Base class: something the user can fix (bad input, missing weights, bad config)."""


class ConfigError(GraftError):
    pass


class DataError(GraftError):
    pass


class BackboneError(GraftError):
    pass


class TrainingDiverged(GraftError):
    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
