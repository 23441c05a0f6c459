"""Losses as pure functions returning named terms (interpolant, dispersive, alignment, StableVM).

Empty until the model issue lands; see README, 'Status'.
"""
