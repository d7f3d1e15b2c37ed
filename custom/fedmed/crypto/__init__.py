"""Selective homomorphic encryption (CKKS, TenSEAL): pack, encrypt, aggregate and decrypt chosen model layers."""
