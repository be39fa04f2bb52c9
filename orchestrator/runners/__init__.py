"""One runner per trial kind over one base (the phases every trial goes through)."""
