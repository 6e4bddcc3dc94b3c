from dittune.errors import DittuneError


class TunerError(DittuneError):
    """The tuning request cannot be carried out (bad --fix, empty space, unusable preset)."""
