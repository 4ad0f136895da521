"""`python -m emulator`: the `emulator` command."""

from emulator.cli import main

main()
