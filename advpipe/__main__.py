"""Entry point for ``python -m advpipe`` (also what ``torchrun -m advpipe`` runs)."""

from advpipe.cli import main

if __name__ == "__main__":
    main()
