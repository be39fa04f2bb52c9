"""The guests: images, libvirt, domains, overlays, saved states, SSH, readiness, cleanup."""
