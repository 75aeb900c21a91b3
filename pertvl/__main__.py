"""`python -m pertvl …` is the same as the `pertvl` console script (needed under launchers)."""

from pertvl.cli import run

if __name__ == "__main__":
    run()
