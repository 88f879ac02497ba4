"""``python -m adasplash_tune``: the ``adasplash-tune`` command without its console script."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="adasplash-tune")
