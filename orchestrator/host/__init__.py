"""The host: /proc and /sys parsers, KSM knobs that remember, the sampler, host facts."""
