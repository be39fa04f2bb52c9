"""The study folder: the write side, the read side, the catalog of studies, prune, collect."""
