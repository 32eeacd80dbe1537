"""SMTP receive: listeners, connector sessions, limits, TLS, AUTH, durable acceptance."""
