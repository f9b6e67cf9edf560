"""SMTP front-ends: relay-in from other mail servers (and, later, submission)."""
