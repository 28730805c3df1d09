"""`python -m bench`; see bench.cli. Guarded: SGLang's spawned processes import this module."""

if __name__ == "__main__":
    import sys

    from bench.cli import main

    sys.exit(main())
