"""The book's build tooling, run as modules from the repository root: `python -m tools.build_book`."""
