"""Transformer Engine STAND-IN (tests only): `transformer_engine.common`, recipes only."""
