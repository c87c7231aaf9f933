"""``python -m wherefrom.cli``: the same as the ``wherefrom`` command."""

from wherefrom.cli import app

app()
