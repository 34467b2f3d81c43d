"""Context-parallel attention algorithms, one module each, composed by the modes (`transformers_cp.modes`)."""
