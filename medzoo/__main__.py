"""`python -m medzoo` = the `medzoo` command (works where the console script is not on PATH)."""
from medzoo.cli import main

main()
