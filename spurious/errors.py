"""User-facing error type: anything raised as `SpuriousError` is a bad input, shown as one line."""


class SpuriousError(ValueError):
    """A user mistake (bad name, bad value, missing data); the CLI prints it on one line and exits 2."""
