"""Integrations of hesse with other libraries (each needs its optional extra).

* :mod:`hesse.integrations.laplace`: curvature backends for laplace-torch
  (``pip install "hesse[laplace]"``).

Importing this package imports none of them.
"""
