"""`python -m mamlpp_fast ...` is the `mamlpp` command (see mamlpp_fast/cli.py)."""
import sys

from .cli import main

sys.exit(main())
