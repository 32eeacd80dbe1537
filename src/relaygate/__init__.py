"""RelayGate: an SMTP relay administered like an Exchange receive connector."""

__version__ = "0.1.0"
