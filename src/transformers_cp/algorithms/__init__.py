"""Context-parallel attention algorithms, one module each, composed by `transformers_cp.attention`."""
