"""Which configured domain's keys sign a message whose signing domain is ``domain``.

One rule for the signer and the doctor, so that the doctor checks the key the relay uses:

* a domain with any ``[[dkim]]`` entry of its own (enabled or not, loadable or not) is signed by
  its own keys only: a disabled or broken key of ``alerts.corp.example`` means "do not sign that
  domain's mail", not "let the parent's key sign it instead";
* otherwise the nearest parent with an enabled entry that has ``subdomains = true`` signs
  (``d=`` the parent: DMARC's relaxed alignment, the default ``adkim=r``, takes it for the
  subdomain's mail; strict alignment, ``adkim=s``, does not);
* otherwise nobody: the message goes out unsigned.
"""

from __future__ import annotations

from collections.abc import Container

__all__ = ["signing_domain_for"]


def signing_domain_for(
    domain: str, configured: Container[str], subdomain_parents: Container[str]
) -> str | None:
    """The domain whose keys sign ``domain``'s mail, or None. All three are normalised (lower
    case A-labels, no trailing dot). ``configured``: every domain with a ``[[dkim]]`` entry;
    ``subdomain_parents``: those with an enabled entry marked ``subdomains = true``."""
    if domain in configured:
        return domain
    rest = domain
    while True:
        _, dot, rest = rest.partition(".")
        if not dot or "." not in rest:  # a parent needs two labels: never a bare TLD
            return None
        if rest in subdomain_parents:
            return rest
