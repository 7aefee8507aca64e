"""``python -m vimtr ...`` (also what ``torchrun -m vimtr ...`` runs)."""
from vimtr.cli import main

if __name__ == "__main__":
    main()
