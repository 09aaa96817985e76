"""``python -m inferopt``: the same as the ``inferopt`` command."""

from .cli import main

main()
