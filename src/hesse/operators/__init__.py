"""Curvature operators: the operator core and the Hessian, GGN and Fisher of functions and models."""
