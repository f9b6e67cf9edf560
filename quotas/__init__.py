"""Quota policy and accounting (Spam excluded) and warnings."""
