"""`python -m tinymath ...` (also what `accelerate launch -m tinymath train ...` runs)."""

from tinymath.cli import app

if __name__ == "__main__":
    app()
