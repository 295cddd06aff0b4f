"""C{python -m imgresume}: the same as the C{imgresume} command."""

from imgresume.cli import main

main()
