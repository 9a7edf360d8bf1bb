"""Exceptions that carry a message meant for the user (file name + problem)."""


class InputError(ValueError):
    """Raised for bad user input: the message names the file and what is wrong with it."""


class RegistrationError(InputError):
    """Raised when a scan cannot be aligned to the template (quality below the limit)."""
