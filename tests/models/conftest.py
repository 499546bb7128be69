"""Real-model tests: torchvision's op schemas are defined before anything imports it."""

from tests.models._torchvision_shim import install

install()
