"""Storage: SQLAlchemy models and migrations, the mail store, the blob store."""
