"""Errors that mean "the user asked for something wrong": the CLI prints them as one line."""


class UserInputError(ValueError):
    """Bad configuration or input, detected before heavy work; the message names value and valid range."""
