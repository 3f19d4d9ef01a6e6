"""`python -m openscope.cli` (what torchrun starts): the same entry point as the `openscope` command."""

from openscope.cli import main

main()
