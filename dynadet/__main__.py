"""``python -m dynadet`` (so ``torchrun -m dynadet train ...`` works)."""

from dynadet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
