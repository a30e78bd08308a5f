"""`python -m normswap` (and `accelerate launch -m normswap`) runs the CLI."""
from normswap.cli import main

main()
