"""Differential privacy at the hospital: DP-SGD with Opacus, an RDP accountant kept across rounds, and a budget
the site enforces itself."""
