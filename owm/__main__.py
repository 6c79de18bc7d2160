"""``python -m owm`` runs the command line, like the ``owm`` console script."""

from owm.cli.main import main

main()
