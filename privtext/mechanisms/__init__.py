"""Perturbation mechanisms: one module per mechanism, its privacy map beside its sampler."""

from privtext.mechanisms.base import Guarantee, Mechanism, MechanismParams
from privtext.mechanisms.registry import available, create, get, register

__all__ = ["Guarantee", "Mechanism", "MechanismParams", "available", "create", "get", "register"]
