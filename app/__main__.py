"""``python -m app [options]``: serve with uvicorn; ``python -m app --help`` lists the options (app/cli.py)."""

import sys

from app.cli import serve

if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
