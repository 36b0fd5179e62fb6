"""lopd: Lightning OPD (offline on-policy distillation) as containerized batch jobs."""

__version__ = "0.1.0"


class LopdError(Exception):
    """An error lopd reports to the user as one line (no traceback) and a non-zero exit."""

    exit_code = 2
