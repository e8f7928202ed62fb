"""The one exception type scenarios/ raises for bad user input."""


class StreamError(ValueError):
    """A stream or domain given by the user cannot be built.

    The message is one line naming the domain (or preset/option) and what is
    wrong with it; the CLI prints it and exits with status 2.
    """
