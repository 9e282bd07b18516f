"""The JWT signature algorithms the proxy can accept: asymmetric ones only.

One definition for both the settings (which refuse anything else at load) and the verifier (which
refuses anything else even from a policy built by hand). An HMAC "key" would have to be a shared
secret, and accepting HS* beside RS*/ES* is the classic key-confusion hole; "none" is never a
signature.
"""

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHM_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
ASYMMETRIC_JWT_ALGORITHMS = RSA_ALGORITHMS | frozenset(EC_ALGORITHM_BY_CURVE.values()) | {"EdDSA"}
