"""``python -m bench.gpu``: see the package's docstring."""
import sys

from bench.gpu.cli import main

sys.exit(main())
