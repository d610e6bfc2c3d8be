"""`python -m deepisles` runs the CLI."""

from deepisles.cli import main

main()
