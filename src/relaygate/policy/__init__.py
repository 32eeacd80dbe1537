"""Policy: the pure decisions (connector selection, session rights, MAIL/RCPT verdicts). No I/O here.

The SMTP server, `relaygate explain`, `relaygate audit` and the admin centre all call these functions,
so what `explain` says is what the server does.
"""
