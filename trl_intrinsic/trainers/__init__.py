"""Trainers and their configs (imported lazily from ``trl_intrinsic``).

``common`` holds everything the trainers share; trainer modules never import each other.
"""
