"""The commands: one module each, `main` registers them."""
