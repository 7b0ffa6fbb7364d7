"""Security: identities from mTLS certificates, the policy of who may do what, limits, and the
audit log (docs/security.md)."""
