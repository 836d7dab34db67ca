"""``python -m ndvi_scale`` = the ``ndvi-scale`` command."""

from .cli import main

main()
