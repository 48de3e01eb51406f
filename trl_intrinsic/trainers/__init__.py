"""Trainers and their configs (imported lazily from ``trl_intrinsic``)."""
