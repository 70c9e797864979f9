"""`python -m streamquant`: the same command line as the `streamquant` console script."""

from streamquant.cli.main import main

# The guard matters: `launch()` spawns ranks that re-import the parent's main module.
if __name__ == "__main__":
    raise SystemExit(main())
