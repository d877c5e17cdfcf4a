"""Small, self-contained experiments on mmoe-ds's routing (see docs/experiments.md)."""
