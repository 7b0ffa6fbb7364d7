"""``python -m discovery``: the same as the ``discovery`` command."""

from discovery.cli.main import run

run()
