"""Site side, pure: one hospital's round (accept, train, validate, sign, encrypt) and its own settings."""
