"""Curvature of the calibration loss: the loss as a function of the layer parameters, Hessian-vector products,
Lanczos and Hutchinson (loss.py, spectrum.py), and closed-form second derivatives of the norm layers
(norm_hessians.py), each checked against autograd in float64."""
