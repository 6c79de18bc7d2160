"""``python -m owm`` runs the command line, like the ``owm`` console script."""

from owm.cli import main

main()
