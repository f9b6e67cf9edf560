"""The IMAP server for agents' mail clients: pure core (parser, session, MIME) and one I/O class."""
