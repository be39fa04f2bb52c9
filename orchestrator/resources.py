"""Files the program reads at run time that ship inside the package (wheel or checkout).

They are found through importlib.resources, never through the checkout's layout, so an
installed wheel finds the same files as `pip install -e .`:

  guests/domain_templates/   default libvirt domain XML (guests/domains.py)
  guests/image_recipes/      guest image recipes and the guest files they name (guests/images.py)
  guests/host-setup.sh       host packages + libvirtd (guests/hostsetup.py, the Makefile)
  report/templates/          the study, compare and history pages (report/)

The top-level domain_templates/ and workloads/images/ of a checkout are symlinks to these.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from orchestrator.errors import HostError


def package_file(*parts: str) -> Path:
    """A shipped file or folder as a real path (libvirt, jinja and bash need one).

    Only an install that unpacked the package into files can give that; a zipped one cannot.
    """
    ref = importlib.resources.files("orchestrator").joinpath(*parts)
    if not isinstance(ref, Path):
        raise HostError(
            f"ksm-lab's {'/'.join(parts)} is inside an archive ({ref}); "
            "install ksm-lab as files (pip install, not a zipapp)"
        )
    return ref


def package_root() -> Path:
    """The folder holding the `orchestrator` package: what a child interpreter needs on its
    PYTHONPATH to import the same ksm-lab (site-packages for a wheel, the checkout otherwise)."""
    return package_file().parent


def is_recipe_name(value: str) -> bool:
    """A recipe given as a bare name ("debian-sysbench") is a shipped one; a value with a slash
    or ending in .toml is a path to the user's own."""
    return "/" not in value and not value.endswith(".toml")
