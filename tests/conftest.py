import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from bilevel.problems import DatasetUnavailable

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def load_debian_data(load: Callable[[], Any], package: str) -> Any:
    """``load()``, or, when it raises :class:`DatasetUnavailable`: a failure when running as root (CI runs as root, and
    ``scripts/setup.sh`` apt-installs ``package`` there, so missing data is a broken set-up, never a silent skip), a
    skip saying so otherwise."""
    try:
        return load()
    except DatasetUnavailable as e:
        if os.geteuid() == 0:
            pytest.fail(f"running as root but Debian's {package} is not installed ({e}); scripts/setup.sh installs it "
                        "when run as root: run it, or `apt-get install --no-install-recommends " + package + "`.")
        pytest.skip(f"not root and Debian's {package} is not installed (scripts/setup.sh installs it only as root): {e}")


@pytest.fixture(scope="session")
def debian_data() -> Callable[[Callable[[], Any], str], Any]:
    """``debian_data(load, package)``: see :func:`load_debian_data`."""
    return load_debian_data
