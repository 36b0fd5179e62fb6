"""The ``lopd`` command line (Click): commands on top, the runners below them.

Every user-facing error is one line on stderr and a non-zero exit: :class:`lopd.LopdError`
subclasses carry their own message; nothing prints a traceback unless ``LOPD_DEBUG=1``.
Nothing in lopd imports this package; its modules import the runners:

- :mod:`lopd.cli.artifacts`  recipe validate/show, store ls, init-model, fingerprint, verify
- :mod:`lopd.cli.local`      stages, run, pipeline (local or k8s backend), report, repro
- :mod:`lopd.cli.k8s`        render, deploy, status, logs
"""

from __future__ import annotations

import click

from lopd import __version__
from lopd.cli import artifacts, k8s, local
from lopd.cli.options import LopdGroup
from lopd.stages import STAGES

HELP = f"""Lightning OPD: offline on-policy distillation as batch jobs (local or Kubernetes).

Stages: {" -> ".join(STAGES)} (`lopd stages`). See README.md."""


@click.group(cls=LopdGroup, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lopd")
def main() -> None:
    pass


for _module in (artifacts, local, k8s):
    for _cmd in _module.COMMANDS:
        main.add_command(_cmd)
