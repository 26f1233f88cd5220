"""The ``endor-gds`` command line: the parser is built here cheaply; each command imports what it
needs when it runs, so ``endor-gds --help`` stays fast."""

from endor_gds.cli.main import main

__all__ = ["main"]
