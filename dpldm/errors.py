"""User-facing errors: the CLI prints their message as one line and exits 2."""


class DpldmError(Exception):
    """Bad input or a refused action; the message names the file/field and what was expected."""


class PrivacyBudgetExceeded(DpldmError):
    """A run would spend more than its target epsilon."""
