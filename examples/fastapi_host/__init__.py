"""An example FastAPI host application that mounts liveness-proxy (see README.md)."""
