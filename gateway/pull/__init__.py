"""Pulling mail from upstream IMAP mailboxes."""
