"""Who sent what and what the server must not read: hybrid signatures and selective CKKS encryption (TenSEAL)."""
