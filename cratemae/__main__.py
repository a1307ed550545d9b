"""`python -m cratemae`: the same as the `cratemae` console script."""

from cratemae.commands.app import main

if __name__ == "__main__":
    main()
