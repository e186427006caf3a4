"""Ray entry points (`python -m jobs.<name>`) and the `breedlabel` CLI. Talks to `core` only."""
