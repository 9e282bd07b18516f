"""The HTTP API: the route table (`routes`), the handlers built on the running service
(`handlers`, `operational`), the audit policy around them (`audit_policy`), the request and answer
checks (`bodies`), the one problem+json builder (`responses`) and the OpenAPI document (`openapi`)."""
