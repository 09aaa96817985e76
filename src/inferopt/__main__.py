"""``python -m inferopt``: the same as the ``inferopt`` command."""

from inferopt._cli import main

main()
